"""Writes torch.save files (pickle protocols 2 and 4) and damaged / hostile ones for
checkpoint/torch_load_test.cc, plus expected.json describing what each valid file holds.

Run with tools/python (PyTorch 2.13): make_torch_save_files.py OUT_DIR

Nothing here ever unpickles the hostile files; they are only written.
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch

OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)


# ---- expected values as JSON -------------------------------------------------------------

def encode(value, storages):
    if value is None:
        return {"t": "none"}
    if isinstance(value, bool):
        return {"t": "bool", "v": value}
    if isinstance(value, int):
        return {"t": "int", "v": value}
    if isinstance(value, float):
        return {"t": "float", "v": value.hex()}
    if isinstance(value, str):
        return {"t": "str", "v": value}
    if isinstance(value, bytes):
        return {"t": "bytes", "v": value.hex()}
    if isinstance(value, torch.Tensor):
        ptr = value.storage().data_ptr()
        storages.setdefault(ptr, len(storages))
        flat = value.detach().reshape(-1)
        if value.dtype.is_floating_point:
            values = [float(x).hex() for x in flat.double().tolist()]
        else:
            values = [int(x) for x in flat.long().tolist()]
        return {"t": "tensor", "dtype": str(value.dtype).replace("torch.", ""),
                "shape": list(value.shape), "stride": list(value.stride()),
                "offset": value.storage_offset(), "storage": storages[ptr],
                "storage_numel": value.storage().size(),
                "requires_grad": value.requires_grad, "values": values}
    if isinstance(value, list):
        return {"t": "list", "items": [encode(v, storages) for v in value]}
    if isinstance(value, tuple):
        return {"t": "tuple", "items": [encode(v, storages) for v in value]}
    if isinstance(value, dict):
        return {"t": "dict", "items": [[encode(k, storages), encode(v, storages)]
                                       for k, v in value.items()]}
    raise TypeError(type(value))


expected = {}


def save(name, value, protocol):
    torch.save(value, os.path.join(OUT, name + ".pt"), pickle_protocol=protocol)
    expected[name] = encode(value, {})


# ---- valid files -------------------------------------------------------------------------

def values():
    base = torch.arange(24, dtype=torch.float32)
    dtypes = collections.OrderedDict()
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                  torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]:
        if dtype == torch.bool:
            t = torch.tensor([True, False, True])
        elif dtype.is_floating_point:
            t = torch.tensor([1.5, -2.25, 3e-3, 65504.0 if dtype == torch.float16 else 1e30])
            t = t.to(dtype)
        else:
            info = torch.iinfo(dtype)
            t = torch.tensor([info.min, -1 if info.min < 0 else 0, 1, info.max], dtype=dtype)
        dtypes[str(dtype).replace("torch.", "")] = t
    mat = base.view(4, 6)
    return {
        "dtypes": dtypes,
        "zero_dim": {"float": torch.tensor(2.5), "long": torch.tensor(7),
                     "bfloat16": torch.tensor(-1.0, dtype=torch.bfloat16),
                     "bool": torch.tensor(True)},
        "empty": torch.zeros(0, 3),
        "shared": {"base": base, "slice": base[5:9], "matrix": mat,
                   "transposed": mat.t(), "strided": mat[1:, ::2], "element": base[17]},
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
        "frozen_parameter": torch.nn.Parameter(torch.ones(3), requires_grad=False),
        "ordered": collections.OrderedDict([("z", 1), ("a", 2), ("m", 3)]),
        "nested": {0: {"x": [1, 2, {"deep": (3, 4)}], 1: None}, "s": {5: "five", -6: "minus six"}},
        "betas": (0.9, 0.999),
        "none": None, "true": True, "false": False,
        "ints": [0, 1, -1, 255, 256, 65535, 65536, -129, 2**31 - 1, -2**31, 2**31, 2**40,
                 2**62, 2**63 - 1, -2**63],
        "floats": [0.0, -0.0, 1e-3, 3.141592653589793, 1e300, float("inf"), float("-inf")],
        "strings": ["", "plain", "ünïcödé ✓", "x" * 300],
        "bytes": [b"", b"\x00\xffab", bytes(range(256))],
        "empty_containers": ([], (), {}),
    }


def adam():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), amsgrad=True)
    for _ in range(2):
        optim.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optim.step()
    return optim.state_dict()


def model_state():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.Linear(3, 2, bias=False))
    model(torch.randn(6, 4))  # updates running stats and num_batches_tracked
    return model.state_dict()


def with_attributes():
    # Tensors whose Python objects carry attributes pickle through
    # torch._tensor._rebuild_from_type_v2, as PyTorch 2.x's FSDP1 full state dict does (it marks
    # each tensor `_has_been_cloned`).
    plain = torch.arange(6.0).view(2, 3)
    plain._has_been_cloned = True
    param = torch.nn.Parameter(torch.ones(4))
    param._marker = "kept by Python only"
    return {"plain": plain, "param": param, "untouched": torch.zeros(2)}


for protocol in (2, 4):
    save("values_p%d" % protocol, values(), protocol)
    save("adam_p%d" % protocol, adam(), protocol)
    save("model_p%d" % protocol, model_state(), protocol)
save("with_attributes", with_attributes(), 2)

# The same archive written again by Python's zipfile (no data descriptors, no zip64 records)
# under another top folder name.
with zipfile.ZipFile(os.path.join(OUT, "values_p2.pt")) as src, \
        zipfile.ZipFile(os.path.join(OUT, "rezipped.pt"), "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
        dst.writestr("renamed_folder/" + info.filename.split("/", 1)[1], src.read(info))
expected["rezipped"] = expected["values_p2"]

# PyTorch 2.x writes <archive>/byteorder ("little" here); 1.13 did not. One file each way, and
# one that claims big-endian data.
with zipfile.ZipFile(os.path.join(OUT, "values_p4.pt")) as src:
    entries = [(i.filename, src.read(i)) for i in src.infolist() if not i.filename.endswith("/byteorder")]
with zipfile.ZipFile(os.path.join(OUT, "with_byteorder.pt"), "w") as dst:
    for entry, data in entries + [("values_p4/byteorder", b"little")]:
        dst.writestr(entry, data)
expected["with_byteorder"] = expected["values_p4"]
with zipfile.ZipFile(os.path.join(OUT, "without_byteorder.pt"), "w") as dst:
    for entry, data in entries:
        dst.writestr(entry, data)
expected["without_byteorder"] = expected["values_p4"]
with zipfile.ZipFile(os.path.join(OUT, "big_endian.pt"), "w") as dst:
    for entry, data in entries + [("values_p4/byteorder", b"big")]:
        dst.writestr(entry, data)

# ---- refused files -----------------------------------------------------------------------

def write_zip(name, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(os.path.join(OUT, name), "w", compression) as z:
        for entry, data in entries:
            z.writestr(entry, data)


with zipfile.ZipFile(os.path.join(OUT, "values_p2.pt")) as src:
    write_zip("compressed.pt", [(i.filename, src.read(i)) for i in src.infolist()],
              zipfile.ZIP_DEFLATED)

torch.save({"a": torch.ones(2)}, os.path.join(OUT, "legacy.pt"),
           _use_new_zipfile_serialization=False)

MARKER = os.path.join(OUT, "pwned")


class RunsACommand:
    """Pickles as a call of os.system; only ever written, never loaded."""

    def __reduce__(self):
        return (os.system, ("touch '%s'" % MARKER,))


for protocol in (2, 4):
    write_zip("forbidden_global_p%d.pt" % protocol, [
        ("evil/data.pkl", pickle.dumps({"state": RunsACommand()}, protocol=protocol)),
        ("evil/version", b"3\n")])


# _rebuild_from_type_v2 may only rebuild a plain tensor or a Parameter with _rebuild_tensor_v2.
write_zip("rebuild_from_type_other_func.pt", [
    ("rft/data.pkl", b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n"
                     b"(ccollections\nOrderedDict\nctorch\nTensor\n)}tR."),
    ("rft/version", b"3\n")])


class StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class TensorRef:
    """Pickles as _rebuild_tensor_v2 over a storage reference, like torch.save does."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def crafted_pickle(value):
    buf = io.BytesIO()
    StoragePickler(buf, protocol=2).dump(value)
    return buf.getvalue()


ten_floats = struct.pack("<10f", *range(10))
# The pickle claims 2**40 floats in a 40-byte entry.
write_zip("huge_numel.pt", [
    ("huge/data.pkl", crafted_pickle({"w": TensorRef(StorageRef("0", 2**40), 0, (2**40,), (1,))})),
    ("huge/data/0", ten_floats), ("huge/version", b"3\n")])
# A view of 1000 elements on a 10-element storage.
write_zip("view_outside.pt", [
    ("outside/data.pkl", crafted_pickle({"w": TensorRef(StorageRef("0", 10), 2, (1000,), (1,))})),
    ("outside/data/0", ten_floats), ("outside/version", b"3\n")])
# A storage the archive does not hold.
write_zip("missing_storage.pt", [
    ("missing/data.pkl", crafted_pickle({"w": TensorRef(StorageRef("7", 10), 0, (10,), (1,))})),
    ("missing/data/0", ten_floats), ("missing/version", b"3\n")])
# A str claiming 4 GiB - 16 bytes in a tiny pickle.
write_zip("huge_string.pt", [
    ("hstr/data.pkl", b"\x80\x02X\xf0\xff\xff\xffabc."), ("hstr/version", b"3\n")])
# An opcode torch.save never writes (INST).
write_zip("unsupported_opcode.pt", [
    ("op/data.pkl", b"\x80\x02(ibuiltins\nlist\n."), ("op/version", b"3\n")])

# ---- zip64 extended information, as torch.save's writer (miniz) puts in the central
# directory for entries at or beyond 4 GiB: here every entry's sizes and offset are moved
# into a zip64 extra field, by a writer of our own (zipfile only does that past 4 GiB).

def write_zip64(name, entries):
    import binascii
    out = bytearray()
    central = bytearray()
    for entry, data in entries:
        entry = entry.encode()
        offset = len(out)
        crc = binascii.crc32(data)
        out += struct.pack("<IHHHHHIIIHH", 0x04034b50, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF,
                           0xFFFFFFFF, len(entry), 20)
        out += entry + struct.pack("<HHQQ", 1, 16, len(data), len(data)) + data
        extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014b50, 45, 45, 0, 0, 0, 0, crc,
                               0xFFFFFFFF, 0xFFFFFFFF, len(entry), len(extra), 0, 0, 0, 0,
                               0xFFFFFFFF)
        central += entry + extra
    cd_offset = len(out)
    out += central
    record_offset = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064b50, 44, 45, 45, 0, 0, len(entries), len(entries),
                       len(central), cd_offset)
    out += struct.pack("<IIQI", 0x07064b50, 0, record_offset, 1)
    out += struct.pack("<IHHHHIIH", 0x06054b50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(out)
    with zipfile.ZipFile(os.path.join(OUT, name)) as check:  # Python agrees it is a zip
        assert check.testzip() is None
        assert [i.file_size for i in check.infolist()] == [len(d) for _, d in entries]


with zipfile.ZipFile(os.path.join(OUT, "values_p4.pt")) as src:
    write_zip64("zip64_extras.pt", [("zip64/" + i.filename.split("/", 1)[1], src.read(i))
                                    for i in src.infolist()])
expected["zip64_extras"] = expected["values_p4"]

# ---- pickles that would expand without bound ---------------------------------------------
# 100000 lists nested in each other.
write_zip("deep_nesting.pt", [
    ("deep/data.pkl", b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b"."),
    ("deep/version", b"3\n")])
# A list that contains itself.
write_zip("cycle.pt", [("cycle/data.pkl", b"\x80\x02]q\x00h\x00a."), ("cycle/version", b"3\n")])
# 40 levels of lists holding the level below twice: 2**40 values in a few hundred bytes.
doubling = bytearray(b"\x80\x02]q\x00")
for level in range(40):
    doubling += b"](h" + bytes([level]) + b"h" + bytes([level]) + b"eq" + bytes([level + 1])
doubling += b"."
write_zip("shared_doubling.pt", [("dbl/data.pkl", bytes(doubling)), ("dbl/version", b"3\n")])

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f)

"""Project macros: every fsdp-cpp C++ target goes through these, so compile flags, warnings
and linking stay in one place."""

# Our own code compiles with warnings as errors. System headers (LibTorch, abseil, ...) are
# included as system headers, so their warnings do not count.
FSDP_COPTS = [
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
    "-Wno-sign-compare",
    # Options structs are filled with designated initializers that name only what they set.
    "-Wno-missing-field-initializers",
]

def fsdp_cc_library(name, copts = [], **kwargs):
    native.cc_library(name = name, copts = FSDP_COPTS + copts, **kwargs)

def fsdp_cc_binary(name, copts = [], **kwargs):
    native.cc_binary(name = name, copts = FSDP_COPTS + copts, **kwargs)

def fsdp_cc_test(name, copts = [], deps = [], size = "small", **kwargs):
    """A GoogleTest target; `deps` should include a main (//comm:multiprocess_test_main for
    tests that launch ranks)."""
    native.cc_test(
        name = name,
        copts = FSDP_COPTS + copts,
        deps = deps + ["//third_party:gtest"],
        size = size,
        linkstatic = True,
        **kwargs
    )

def fsdp_fuzz_corpus(name):
    """`name + "_fuzz_corpus"`: the seed and regression inputs of //checkpoint/fuzz:NAME_fuzz
    (and its replay test), the files of testdata/fuzz_corpus/NAME/."""
    native.filegroup(
        name = name + "_fuzz_corpus",
        testonly = True,
        srcs = native.glob(["testdata/fuzz_corpus/%s/*" % name]),
        visibility = ["//checkpoint/fuzz:__pkg__"],
    )

def fsdp_cc_fuzz_test(name, srcs, corpus, deps = [], copts = [], **kwargs):
    """A libFuzzer target and its replay test.

    `srcs` define `LLVMFuzzerTestOneInput`. `corpus` is a label (a filegroup) of seed and
    regression inputs. Makes:
      * `name`: the fuzz binary, tagged "fuzz" and "manual" (not part of //...); build it with
        `--config=fuzz` (Debian's clang, -fsanitize=fuzzer,address), see checkpoint/fuzz/README.md
        and tools/fuzz.sh;
      * `name + "_replay_test"`: a GoogleTest under the default gcc build (and asan / ubsan)
        that runs every corpus file once through the same function, so CI replays the seeds
        and every regression input without clang.
    """
    native.cc_binary(
        name = name,
        srcs = srcs,
        copts = FSDP_COPTS + copts,
        deps = deps,
        linkopts = ["-fsanitize=fuzzer"],
        linkstatic = True,
        testonly = True,
        tags = ["fuzz", "manual"],
        **kwargs
    )
    fsdp_cc_test(
        name = name + "_replay_test",
        srcs = srcs,
        copts = copts,
        deps = deps + ["//checkpoint/fuzz:replay_main"],
        data = [corpus],
        args = ["$(rootpaths %s)" % corpus],
        **kwargs
    )

def fsdp_cc_test_split_ws8(name, srcs, deps, size, shard_count, ws8_shard_count, tags = []):
    """Two tests from one compiled source: `name` runs every case but those named `.../ws8...`
    (world size 8), `name + "_ws8"` only those. Eight rank processes on a small machine take
    longest, so they get a target of their own, sharded apart and timed apart."""
    fsdp_cc_library(
        name = name + "_cases",
        testonly = True,
        srcs = srcs,
        deps = deps + ["//third_party:gtest"],
        alwayslink = True,
    )
    for suffix, gtest_filter, shards in [("", "-*/ws8*", shard_count), ("_ws8", "*/ws8*", ws8_shard_count)]:
        fsdp_cc_test(
            name = name + suffix,
            args = ["--gtest_filter=" + gtest_filter],
            deps = [":" + name + "_cases"],
            size = size,
            shard_count = shards,
            tags = tags,
        )

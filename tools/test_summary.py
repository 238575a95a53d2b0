"""Counts test cases over the GoogleTest XML reports that `bazel test` left.

Usage: test_summary.py TESTLOGS_DIR [TESTLOGS_DIR...]
Prints "tests: N passed, N failed, N skipped" (one word with a colon, then the counts) and
exits 1 when any case failed or no case ran at all.
"""
import pathlib
import sys
import xml.etree.ElementTree as ET


def main(dirs):
    passed = failed = skipped = 0
    seen = set()
    for d in dirs:
        if not d:
            continue
        for xml in pathlib.Path(d).rglob("test.xml"):
            real = xml.resolve()
            if real in seen:
                continue
            seen.add(real)
            try:
                root = ET.parse(real).getroot()
            except ET.ParseError:
                failed += 1
                print(f"unreadable report: {real}")
                continue
            for case in root.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed += 1
                elif case.find("skipped") is not None or case.get("result") == "skipped":
                    skipped += 1
                else:
                    passed += 1
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

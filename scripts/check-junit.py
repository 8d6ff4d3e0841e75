#!/usr/bin/env python3
"""CI: fail unless the junit XML of a pytest run shows tests ran and none was skipped."""

import sys
import xml.etree.ElementTree as ET


def main(path: str) -> int:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    print(f"ci: {path}: {tests} tests, {skipped} skipped")
    if tests == 0:
        print("ci: no tests ran", file=sys.stderr)
        return 1
    if skipped:
        for case in root.iter("testcase"):
            for s in case.findall("skipped"):
                print(f"ci: skipped {case.get('classname')}::{case.get('name')}: "
                      f"{s.get('message')}", file=sys.stderr)
        print("ci: tests were skipped (FUSE and tool tests must run in CI)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/junit.xml"))

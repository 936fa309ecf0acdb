"""Run by tests/test_cpython_suite.py: runs test_socketserver_sockserve with unittest, prints the outcome as JSON.

Usage: ``python cpython_suite_driver.py FOLDER``, FOLDER holding
``test_socketserver_sockserve.py``. Prints ``{"run", "failures", "errors", "details",
"skipped", "module_under_test"}``: the count of tests run, the ids of those that failed,
erred or were skipped, the failures' and errors' tracebacks, and the name of the module
the suite imported as ``socketserver``.
"""

from __future__ import annotations

import json
import sys
import unittest


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    suite = unittest.TestLoader().loadTestsFromName("test_socketserver_sockserve")
    result = unittest.TestResult()
    suite.run(result)
    import test_socketserver_sockserve as t

    print(json.dumps({
        "run": result.testsRun,
        "failures": sorted(test.id() for test, _ in result.failures),
        "errors": sorted(test.id() for test, _ in result.errors),
        "details": [text for _, text in result.failures + result.errors],
        "skipped": sorted(test.id() for test, _ in result.skipped),
        "module_under_test": t.socketserver.__name__,
    }))


if __name__ == "__main__":
    main()

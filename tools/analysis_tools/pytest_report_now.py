"""pytest plugin: print each failure's traceback the moment it happens, so
that a run killed at its time limit (a lent GPU's short lease) still shows
why tests failed. Used by cuda_check.sh: ``-p pytest_report_now``."""


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        print(f'\n=== FAILED {report.nodeid} ({report.when})\n'
              f'{report.longreprtext[-3000:]}\n', flush=True)

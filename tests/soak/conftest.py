"""The soak suite (issue 23) is long: it is collected only with MPIFY_SOAK=1 (`MPIFY_SOAK=1 pytest tests/soak -s`)."""
import os

collect_ignore_glob = [] if os.environ.get('MPIFY_SOAK') == '1' else ['test_*.py']

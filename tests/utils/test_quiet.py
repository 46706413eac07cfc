"""utils/quiet.run_tool ends a tool the way the interpreter would: thread
exit hooks, threads, atexit, then the process."""
import subprocess
import sys
import textwrap
from pathlib import Path

QUIET = Path(__file__).resolve().parents[2] / 'mmrepvgg' / 'utils' / 'quiet.py'


def test_a_thread_pool_left_running_does_not_keep_the_tool_alive(tmp_path):
    """A library's ThreadPoolExecutor that is never shut down (OpenVINO's
    telemetry, imported with nncf) ends through its threading exit hook, as
    under a plain interpreter exit; joining its idle workers hung forever."""
    script = tmp_path / 'tool.py'
    script.write_text(textwrap.dedent(f'''
        import atexit, runpy
        from concurrent.futures import ThreadPoolExecutor
        POOL = ThreadPoolExecutor(2)
        def main():
            POOL.submit(print, 'task ran')
            atexit.register(print, 'atexit ran')
            return 3
        runpy.run_path({str(QUIET)!r})['run_tool'](main)
    '''))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc
    assert proc.stdout.split() == ['task', 'ran', 'atexit', 'ran'], proc

"""The suite's own guard: a slow or hung test fails alone, its stacks in the report, and the
run goes on to its summary (the old faulthandler watchdog ended the run with status 1 and no
summary, its stacks lost in pytest's captured stderr). Runs pytest on a throwaway test file
with this suite's conftest.py and pytest.ini."""
import os
import shutil
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TESTS = textwrap.dedent('''
    import signal, threading, time

    def test_before():
        pass

    def test_hangs():
        done = threading.Event()
        threading.Thread(target=done.wait, name="stuck-helper", daemon=True).start()
        done.wait()

    def test_after():
        pass
''')


def run_pytest(tmp_path, body, timeout_s, env=None):
    d = tmp_path / "suite"
    (d / "tests").mkdir(parents=True)
    shutil.copy(os.path.join(HERE, "conftest.py"), d / "tests" / "conftest.py")
    shutil.copy(os.path.join(REPO, "pytest.ini"), d / "pytest.ini")
    (d / "tests" / "test_throwaway.py").write_text(body)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-o", f"timeout={timeout_s}"], cwd=d, capture_output=True, text=True,
                          timeout=240, env=dict(os.environ, **(env or {})))


def test_a_hung_test_fails_alone_with_its_stacks_and_the_run_goes_on(tmp_path):
    r = run_pytest(tmp_path, TESTS, 3)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "1 failed, 2 passed" in out, out  # the summary: the run was not ended
    assert "FAILED tests/test_throwaway.py::test_hangs" in out and "Timeout" in out, out
    assert "stuck-helper" in out, out  # the other threads' stacks are in the report


def test_a_test_the_signal_cannot_reach_is_dumped_to_the_terminal(tmp_path):
    body = textwrap.dedent('''
        import signal, time

        def test_blocks_the_alarm():
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            time.sleep(60)
    ''')
    r = run_pytest(tmp_path, body, 2, env={"IMAGENET_SEQ_TEST_BACKSTOP_S": "3"})
    # the backstop ends this run, but says where: the stack reaches the terminal's stream
    assert r.returncode != 0
    assert "test_blocks_the_alarm" in r.stdout and "Timeout" in r.stdout, r.stdout + r.stderr

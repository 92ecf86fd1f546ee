"""The tests' one check of the rule for bad input (README, docs/common.md): the command prints ONE line
`error: <one sentence>` on stderr and exits 2, with nothing printed before it (stdout or stderr) and no traceback.
And the method files' command line run as a subprocess (one OpenMP thread), as the CLI tests run it.

    run(script, *args, cwd)      `python <script> args` in cwd -> CompletedProcess (text)
    assert_ok(p)                 exit 0 and no traceback
    refusal(code, err, *words)   the strict check of an exit code and a stderr (and `out=`, a stdout that must be
                                 empty) -> the sentence; refused(p, *words) the same for a CompletedProcess
    guarded(capsys, fn, *words)  fn() in-process through common.main_guard, then the strict check -> the sentence
    sentence(msg, *words)        one sentence holding the given words (a UserError, or the text of an `error:` line)
    sha(path)                    a file's SHA-256 (a refusal must leave a checkpoint as it was)
"""
import hashlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, cwd, timeout=300):
    """`python script args` (script: a path, or a file name in the repository) in cwd, with one OpenMP thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def sentence(msg, *words):
    """One sentence: no line break, ends with '.' or '?', no '. ' or '? ' inside; holds each of words. msg: a string, an
    exception, or pytest.raises' ExceptionInfo (its exception). -> the sentence."""
    msg = str(msg.value if hasattr(msg, "value") else msg)
    body = msg.rstrip(".?")
    assert "\n" not in msg and msg.endswith((".", "?")) and body.count(". ") == body.count("? ") == 0, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def refusal(code, err, *words, out=None):
    """Exit status 2, and stderr exactly one line, `error: ` and one sentence holding words (so no traceback, no
    warning and no blank line around it); out (when given): the stdout, which must be empty. err may be
    capsys.readouterr()'s (out, err) pair: then its out must be empty too. -> the sentence."""
    if not isinstance(err, str):
        out, err = err
    assert code == 2, (code, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and err == lines[0] + "\n", err[-3000:]
    assert out is None or out == "", out[-3000:]  # nothing printed before the error line
    return sentence(lines[0][len("error: "):], *words)


def refused(p, *words):
    """refusal for a CompletedProcess: its exit status, its stderr, and an empty stdout."""
    return refusal(p.returncode, p.stderr, *words, out=p.stdout)


def guarded(capsys, fn, *words):
    """fn() through common.main_guard, in-process: it must exit 2 with one `error:` sentence holding words, and
    print nothing else (stdout empty, stderr the one line). -> the sentence."""
    import common
    with pytest.raises(SystemExit) as e:
        common.main_guard(fn)
    return refusal(e.value.code, capsys.readouterr(), *words)  # (refusal: stderr the one line, stdout empty)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

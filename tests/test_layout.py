"""The repository's shape, as a reader relies on it: every method file has the same section markers in the same
order, one marked ALGO LOGIC block in its training loop short enough to read without scrolling, imports no other
method file, needs nothing beside common.py and the dependencies (it runs copied alone with common.py), and no file
cites anything outside the repository."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["imm.py", "flow_map.py", "scm.py", "rectified_flow.py", "distributional.py"]
SKELETON = ["config", "presets", "method", "sampler", "plumbing", "training", "commands"]
MARKER = re.compile(r"^# =+ (.+)$")


def sections(path):
    with open(path) as f:
        lines = f.read().split("\n")
    return [(i, m.group(1)) for i, ln in enumerate(lines) if (m := MARKER.match(ln))], lines


@pytest.mark.parametrize("name", METHODS)
def test_method_file_skeleton(name):
    found, lines = sections(os.path.join(ROOT, name))
    kinds = []
    for _, title in found:
        kind = title.split(":")[0]
        assert kind in SKELETON, f"{name}: unknown section '{title}'"
        if not kinds or kinds[-1] != kind:  # several "method: ..." sections in a row count as one
            kinds.append(kind)
    assert kinds == SKELETON, f"{name}: sections {kinds}"
    assert all(len(ln) == 120 for i, ln in enumerate(lines) if MARKER.match(ln))  # one width, so files diff cleanly
    # exactly one ALGO LOGIC block, inside the training section, at most 20 lines between its two markers
    starts = [i for i, ln in enumerate(lines) if "# ---- ALGO LOGIC:" in ln]
    ends = [i for i, ln in enumerate(lines) if "# ---- end of ALGO LOGIC" in ln]
    assert len(starts) == 1 and len(ends) == 1 and 0 < ends[0] - starts[0] <= 20, (name, starts, ends)
    training = next(i for i, t in found if t == "training")
    commands = next(i for i, t in found if t == "commands")
    assert training < starts[0] < commands


@pytest.mark.parametrize("name", METHODS)
def test_no_method_file_imports_another(name):
    with open(os.path.join(ROOT, name)) as f:
        src = f.read()
    others = [m[:-3] for m in METHODS if m != name]
    bad = [o for o in others if re.search(rf"^\s*(import|from)\s+{o}\b", src, re.M)]
    assert not bad, f"{name} imports {bad}"


def test_nothing_cites_outside_the_repository():
    """No file refers to the private design notes the project started from (users clone the repository alone)."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    # the notes' paths, section signs and numbered tags ("(F" "1)" ... "(S" "14)"), spelt so this file does not match
    # a "spec" named as a document, and the lent GPU machine's own words ("$" "OUT", its "run" tool)
    pat = re.compile("|".join(["shared" "/", "specs" "/", "[Ss]pec" " §", "pit" "fall" r" \d", "DES" "IGN",
                               r"\((?:F|S|N)(?:[1-9]|1\d)\)", r"\b[Tt]he " r"spec\b", r"\bspec" r"'s\b",
                               r"\bspec " "probe", r"\$" r"OUT\b", "the `run` " "tool"]))
    hits = []
    for rel in files:
        with open(os.path.join(ROOT, rel), errors="replace") as f:
            hits += [f"{rel}:{k + 1}" for k, ln in enumerate(f) if pat.search(ln)]
    assert not hits, hits[:20]
    # the notes' bare equation tags (a one- or two-digit number in parentheses) in the Python files; a paper's
    # equation is written "Eq. 6"
    bare = re.compile(r"(?:^|[\s,;:])\(\d{1,2}\)(?=[\s,.;:)\-\u2013]|$)")
    hits = []
    for rel in (f for f in files if f.endswith(".py")):
        with open(os.path.join(ROOT, rel), errors="replace") as f:
            hits += [f"{rel}:{k + 1}" for k, ln in enumerate(f) if bare.search(ln)]
    assert not hits, hits[:20]


def test_common_table_of_contents_matches_its_sections():
    """common.py's docstring lists its sections in file order, and no section runs past 250 lines."""
    found, lines = sections(os.path.join(ROOT, "common.py"))
    titles = [t for _, t in found]
    doc = lines[1:lines.index('"""', 1)]
    labels = [ln[2:21].strip().rstrip(". ") for ln in doc if re.match(r"^  \S", ln)]  # "  label   contents"
    assert len(labels) == len(titles) and all(t.startswith(lab) for t, lab in zip(titles, labels)), \
        list(zip(titles, labels))
    ends = [i for i, _ in found[1:]] + [len(lines)]
    assert max(e - i for (i, _), e in zip(found, ends)) <= 250
    # the names under each label: each one of common.py's top-level names, defined in that section, all in file
    # order; every name a method file uses (C.name) is listed (UserError, defined before the sections, in the intro)
    where = {}  # top-level name -> (line, section title)
    for k, ln in enumerate(lines):
        if m := re.match(r"^(?:def|class) (\w+)|^([A-Za-z]\w*) =", ln):
            where[m.group(1) or m.group(2)] = (k, next((t for i, t in reversed(found) if i < k), None))
    body = doc[next(k for k, ln in enumerate(doc) if re.match(r"^  \S", ln)):]
    chunks = []  # (section title, its names and notes)
    for ln in body:
        if re.match(r"^  \S", ln):
            chunks.append([titles[labels.index(ln[2:21].strip().rstrip(". "))], ""])
        chunks[-1][1] += " " + ln[21:]
    listed = []
    for sec, text in chunks:
        while re.search(r"\([^()]*\)", text):
            text = re.sub(r"\([^()]*\)", "", text)  # the notes in parentheses
        for name in re.findall(r"[A-Za-z_]\w*", text):
            assert name in where and where[name][1] == sec, (name, sec, where.get(name))
            listed.append(name)
    assert [where[n][0] for n in listed] == sorted(where[n][0] for n in listed), listed
    used = set()
    for name in METHODS:
        with open(os.path.join(ROOT, name)) as f:
            used |= set(re.findall(r"\bC\.([A-Za-z]\w*)", f.read()))
    assert used - set(listed) <= {"UserError"} and "UserError" in "\n".join(doc[:5]), sorted(used - set(listed))


def _read(path):
    with open(path) as f:
        return f.read()


def test_every_test_the_documents_name_exists():
    """A document or source file that names a test file (`tests/<file>.py`) or one test (`tests/<file>.py::<test>`)
    names one that exists, so a reader can run it (`pytest tests/<file>.py::<test>`)."""
    files = subprocess.run(["git", "ls-files", "*.md", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    named, missing = 0, []
    for rel in files:
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for m in re.finditer(r"\b(tests/\w+\.py)(::(\w*))?", text):
            named, (path, sep, test) = named + 1, m.groups()
            full = os.path.join(ROOT, path)
            if not os.path.isfile(full):
                missing.append(f"{rel} -> {path}")
            elif sep and not (test and re.search(rf"^def {test}\(", _read(full), re.M)):
                missing.append(f"{rel} -> {m.group(0)}")
    assert named > 10 and not missing, missing


def test_every_relative_link_in_the_documents_resolves():
    """README, docs/ and benchmarks/results/ link pictures, pages and result files by relative path: each must exist in
    the repository (a reader who clones it alone follows them)."""
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    missing = []
    for rel in files:
        with open(os.path.join(ROOT, rel)) as f:
            for target in re.findall(r"\]\(([^)#\s]+)", f.read()):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                path = os.path.normpath(os.path.join(os.path.dirname(rel), target))
                if path not in tracked and not any(t.startswith(path + "/") for t in tracked):
                    missing.append(f"{rel} -> {target}")
    assert files and not missing, missing


# what a method file may import: Python's own modules, the five dependencies, common.py; `lpips` and `timm` only as
# optional extras, imported inside a function where their absence is a fallback or one sentence
ALLOWED = {"torch", "torchvision", "numpy", "matplotlib", "PIL", "common"}  # (PIL: pillow, which both need too)
OPTIONAL = {"lpips", "timm"}


def _imports(src):
    """(top-level package, run at import time?) of every import statement: at import time unless inside a function
    (a `try:` or `if` at module level runs at import time too)."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not getattr(child, "level", 0):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module]
                out.extend((n.split(".")[0], not in_function) for n in names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    visit(ast.parse(src), False)
    return out


@pytest.mark.parametrize("name", [*METHODS, "common.py"])
def test_a_method_file_needs_only_common_and_the_dependencies(name):
    """An engineer copies one method file and common.py into a project: neither may import anything else of the
    repository (tests/, benchmarks/) or beyond the dependencies; the optional extras only inside a function."""
    src = _read(os.path.join(ROOT, name))
    bad = [(m, top) for m, top in _imports(src)
           if m not in sys.stdlib_module_names and m not in ALLOWED and (m not in OPTIONAL or top)]
    assert not bad and not re.search(r"\bimportlib\b|__import__\(", src), bad  # (nothing imported by name)


def test_a_copied_method_file_trains_and_samples_beside_common_alone(tmp_path):
    """imm.py and common.py copied alone into an empty folder: a short toy run there, then its `sample` command."""
    for f in ("imm.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "imm.py", *a], cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=300)
    r = run("--iters", "3", "--eval_n", "64", "--device", "cpu", "--out", "run")
    assert r.returncode == 0 and not r.stderr, r.stderr[-2000:]
    r = run("sample", "--ckpt", "run/ckpt.pt", "--steps", "1", "--n", "8", "--out", "s.npy", "--device", "cpu")
    assert r.returncode == 0 and not r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "run")) == sorted(["ckpt.pt", "config.json", "log.jsonl", "metrics.jsonl",
                                                           "samples.png"]) and (tmp_path / "s.npy").is_file()

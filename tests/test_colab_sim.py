"""scripts/colab_sim.py's hardware-independent parts: the requirement closure, wheels, repacking, links."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("colab_sim", ROOT / "scripts" / "colab_sim.py")
colab_sim = importlib.util.module_from_spec(spec)
sys.modules["colab_sim"] = colab_sim  # dataclasses look their module up
spec.loader.exec_module(colab_sim)
Candidate = colab_sim.Candidate


def fake_finder(candidates: dict[str, Candidate]):
    return lambda req: candidates.get(canonicalize_name(req.name), "not here")


def test_resolve_follows_markers_extras_and_provided():
    candidates = {c.name: c for c in [
        Candidate("app", "1.0", ["a>=1", "b; python_version < '3'", "c; extra == 'gpu'",
                                 "d; extra == 'docs'", "e[x]", "missing-one", "ghost; extra == 'docs'"]),
        Candidate("a", "1.5", ["f[http]>=2", "a-dep"]),
        Candidate("a-dep", "1", []),
        Candidate("b", "1", []), Candidate("c", "1", ["a<1"]), Candidate("d", "1", []),
        Candidate("e", "1", ["g; extra == 'x'", "h; extra == 'y'"]),
        Candidate("g", "1", []), Candidate("h", "1", []), Candidate("j", "1", []),
    ]}
    # f comes from torch's closure: it answers for its name, yet its [http] extra still pulls in j
    provided = {"f": Candidate("f", "2.5", ["k", "j; extra == 'http'"]), "k": Candidate("k", "1", [])}
    chosen, problems = colab_sim.resolve(["App[GPU]"], fake_finder(candidates), provided)
    assert set(chosen) == {"app", "a", "a-dep", "c", "e", "g", "f", "k", "j"}
    assert chosen["f"] is provided["f"]
    assert problems == ["missing-one: not here", "a<1: but a 1.5 (project) is chosen"]


def test_resolve_asks_once_per_name_and_reports_each_missing():
    asked = []

    def find(req):
        asked.append(req.name)
        return "gone"

    chosen, problems = colab_sim.resolve(["x", "y", "x>=2"], find)
    assert chosen == {} and asked == ["x", "y"]
    assert problems == ["x: gone", "y: gone"]


def test_project_candidate_turns_extras_into_markers(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "My_Lib"\nversion = "0.3"\ndependencies = ["torch>=2.6", "pyyaml"]\n'
        '[project.optional-dependencies]\n'
        'notebooks = ["bitsandbytes>=0.45", "torchao>=0.12; sys_platform == \'linux\'"]\n')
    project = colab_sim.project_candidate(tmp_path)
    assert (project.name, project.version) == ("my-lib", "0.3")
    reqs = {Requirement(r).name: Requirement(r) for r in project.requires}
    assert reqs["torch"].marker is None and str(reqs["torch"].specifier) == ">=2.6"
    assert reqs["bitsandbytes"].marker.evaluate({"extra": "notebooks"})
    assert not reqs["bitsandbytes"].marker.evaluate({"extra": ""})
    assert reqs["torchao"].marker.evaluate({"extra": "notebooks"}) == (sys.platform == "linux")
    assert not reqs["torchao"].marker.evaluate({"extra": ""})
    chosen, _ = colab_sim.resolve(["my_lib[notebooks]"], fake_finder({"my-lib": project}))
    assert chosen == {"my-lib": project}


def write_wheel(folder: Path, filename: str, requires: list[str]) -> Path:
    name, version = filename.split("-")[:2]
    path = folder / filename
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                    f"Version: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_finder_takes_the_newest_fitting_compatible_wheel_else_the_installed(tmp_path):
    write_wheel(tmp_path, "foo-1.0-py3-none-any.whl", ["bar"])
    newest = write_wheel(tmp_path, "foo-2.0-py3-none-any.whl", ["bar>=2", "baz; extra == 'x'"])
    write_wheel(tmp_path, "foo-3.0-cp27-cp27mu-manylinux1_x86_64.whl", [])  # not for this Python
    find = colab_sim.make_finder([tmp_path])
    best = find(Requirement("foo"))
    assert (best.version, best.wheel, best.requires) == ("2.0", newest, ["bar>=2", "baz; extra == 'x'"])
    assert find(Requirement("foo<2")).version == "1.0"
    assert "do not fit" in find(Requirement("foo>=3"))
    installed = find(Requirement("tqdm"))
    assert installed.dist is not None and installed.version == md.version("tqdm")
    assert "installed" in find(Requirement("tqdm<0.1"))
    assert find(Requirement("no-such-distribution-here")) == "not installed here"


def test_repacked_wheel_installs_and_imports(tmp_path):
    wheel = colab_sim.repack(md.distribution("tqdm"), tmp_path)
    assert wheel.name == f"tqdm-{md.version('tqdm')}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert f"{dist_info}/WHEEL" in names and f"{dist_info}/INSTALLER" not in names
        assert not any("__pycache__" in n for n in names)
        for line in zf.read(f"{dist_info}/RECORD").decode().splitlines():
            path, digest, size = line.split(",")
            if digest:  # every file but RECORD itself carries its true hash and size
                data = zf.read(path)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert (digest, int(size)) == (f"sha256={expected}", len(data)), path
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True)
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); "
                          "import tqdm; print(tqdm.__file__); print(tqdm.__version__)"],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == md.version("tqdm")


def test_repack_refuses_an_editable_install(tmp_path):
    editable = [d for d in md.distributions()
                if json.loads(d.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable")]
    if not editable:  # `make env` installs recipes_lib editable
        pytest.skip("no editable install in this environment")
    with pytest.raises(colab_sim.SetupError, match="editable"):
        colab_sim.repack(editable[0], tmp_path)


def test_linked_distribution_imports_from_the_link_folder(tmp_path):
    linked = colab_sim.link_distributions([md.distribution("tqdm")], tmp_path)
    assert "tqdm" in linked and any(n.endswith(".dist-info") for n in linked)
    assert (tmp_path / "tqdm").is_symlink()
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import importlib.metadata as md, tqdm; "
            "print(tqdm.__file__); print(md.version('tqdm'))")
    out = subprocess.run([sys.executable, "-I", "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[0].startswith(str(tmp_path)) and out[1] == md.version("tqdm")


@pytest.mark.parametrize("keep_going", [False, True])
def test_runner_stops_at_the_first_error_or_lists_them_all(tmp_path, keep_going):
    """The notebook runner the harness writes: by default it stops at the first failing cell; with
    ``--keep-going`` it runs every cell and lists each failing one (one GPU run then finds them all)."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in
                                         ["x = 1", "raise ValueError('first')", "print('ran', x)",
                                          "assert x == 2, 'second'"]])
    src, dst, result_path = tmp_path / "nb.ipynb", tmp_path / "out.ipynb", tmp_path / "result.json"
    nbformat.write(nb, src)
    runner = tmp_path / "run_notebook.py"
    runner.write_text(colab_sim.RUNNER)
    proc = subprocess.run([sys.executable, str(runner), str(src), str(dst), str(result_path), "60", "python3",
                           "1" if keep_going else "0"], capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(result_path.read_text())
    assert proc.returncode == 1 and not result["passed"] and result["failed_cell"] == 1
    executed = nbformat.read(dst, as_version=4)
    printed = "".join(o.get("text", "") for o in executed.cells[2].outputs)
    if keep_going:
        assert [e["index"] for e in result["errors"]] == [1, 3]
        first, second = (e["error"] for e in result["errors"])
        assert "ValueError: first" in first and "AssertionError: second" in second
        assert printed == "ran 1\n"  # the cells after a failure still ran
    else:
        assert "ValueError" in result["error"] and printed == ""

"""The documentation: the MkDocs site under docs/ builds with warnings as errors (a link to a
missing page or anchor fails), and the README's links point at files that exist."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
TIMEOUT = 300  # mkdocs builds these pages in about a second; this is only a hang guard


def _build(config: str, site_dir: str) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason='mkdocs is not installed: pip install -e ".[docs]"')
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           config, "--site-dir", site_dir],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=os.path.dirname(config))


def _nav_pages() -> list:
    """The .md files named in mkdocs.yml's nav (lines `  - Title: page.md`)."""
    return re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", open(os.path.join(ROOT, "mkdocs.yml")).read(),
                      re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("site"))
    return _build(os.path.join(ROOT, "mkdocs.yml"), out), out


def test_docs_build_strict(site):
    run, out = site
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}{run.stderr}"
    pages = _nav_pages()
    on_disk = sorted(f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    assert sorted(pages) == on_disk  # every page is in the nav, and the nav names no other
    for page in pages:
        html = os.path.join(out, "index.html" if page == "index.md" else
                            os.path.join(page[:-3], "index.html"))
        assert os.path.isfile(html), html


def test_a_broken_link_fails_the_build(tmp_path):
    """The guard itself: a copy of the site with one link to a missing anchor and one to a file
    outside docs/ must fail, naming both (mkdocs.yml's validation settings make them warnings)."""
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), tmp_path / "mkdocs.yml")
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    with open(tmp_path / "docs" / "layout.md", "a") as f:
        f.write("\n[a](loader.md#no-such-section) [b](../BENCHMARKS.md)\n")
    run = _build(str(tmp_path / "mkdocs.yml"), str(tmp_path / "site"))
    log = run.stdout + run.stderr
    assert run.returncode != 0, log
    assert "no-such-section" in log and "BENCHMARKS.md" in log


def test_readme_links_point_at_existing_files(request):
    readme = open(os.path.join(ROOT, "README.md")).read()
    links = [t for t in LINK.findall(readme) if not re.match(r"[a-z]+://", t)]
    into_docs = [t for t in links if t.startswith("docs/")]
    # README hands the reference to docs/: one link per page at least
    unlinked = {"docs/" + p for p in _nav_pages()} - {t.partition("#")[0] for t in into_docs}
    assert not unlinked, f"README does not link to {sorted(unlinked)}"
    for target in links:
        path, _, anchor = target.partition("#")
        assert os.path.isfile(os.path.join(ROOT, path)), f"README links to {target}: no such file"
        if anchor and path.startswith("docs/"):
            run, out = request.getfixturevalue("site")
            assert run.returncode == 0, run.stdout + run.stderr
            page = path[len("docs/"):-len(".md")]
            html = open(os.path.join(out, "index.html" if page == "index" else
                                     os.path.join(page, "index.html"))).read()
            assert f'id="{anchor}"' in html, f"README links to {target}: no such anchor"

"""``sdtrain ui``: the kohya_ss workflow in a real headless Chromium, and the rules that keep the
browser inside the root folder (paths, symlinks, caption writes, the token off localhost)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the ui extra is not installed: pip install -e '.[ui]'")

from starlette.testclient import TestClient  # noqa: E402

from tests.conftest import REPO  # noqa: E402
from trainer.checkpoint import complete_checkpoints  # noqa: E402
from trainer.recipe import load_recipe  # noqa: E402
from trainer.ui import dataset, recipe_form  # noqa: E402
from trainer.ui.server import create_app, is_loopback  # noqa: E402

FROG = "datasets/sls_frog"
SUBSET = f"{FROG}/10_sls frog"


@pytest.fixture
def root(tmp_path) -> Path:
    """A UI root holding a copy of the quickstart dataset (the tests edit its captions)."""
    shutil.copytree(REPO / FROG, tmp_path / FROG)
    return tmp_path


def _client(root: Path, token: str | None = None) -> TestClient:
    return TestClient(create_app(root, token), base_url="http://127.0.0.1")


def test_paths_outside_the_root_are_refused(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("secret")
    (root / "escape").symlink_to(outside.parent)
    client = _client(root)
    assert client.get("/api/file", params={"path": f"{SUBSET}/01.txt"}).status_code == 200
    for path in ("../secret.txt", f"{FROG}/../../secret.txt", str(outside), "escape/secret.txt", "/etc/passwd"):
        response = client.get("/api/file", params={"path": path})
        assert response.status_code == 403, path
        assert "secret" not in response.text.replace("secret.txt", "")
    assert client.get("/api/dataset", params={"folder": "escape"}).status_code == 403
    assert client.get("/api/thumbnail", params={"path": "../secret.txt"}).status_code == 403


def test_caption_edits_stay_in_the_dataset_and_keep_the_users_text(root, tmp_path_factory):
    client = _client(root)
    caption = root / SUBSET / "01.txt"
    caption.write_text("sls frog, old\nmy own note\n", encoding="utf-8")
    response = client.post("/api/dataset/caption", json={"folder": FROG, "image": f"{SUBSET}/01.png", "caption": "sls frog, new", "expected": "sls frog, old"})
    assert response.status_code == 200, response.text
    # The first line is what training reads; the user's further lines stay.
    assert caption.read_text(encoding="utf-8") == "sls frog, new\nmy own note\n"
    # Changed on disk since the page showed it: nothing is overwritten.
    stale = client.post("/api/dataset/caption", json={"folder": FROG, "image": f"{SUBSET}/01.png", "caption": "x", "expected": "sls frog, old"})
    assert stale.status_code == 400 and "changed on disk" in stale.json()["error"]
    assert caption.read_text(encoding="utf-8").startswith("sls frog, new\n")

    # An image of another folder under the root is not part of the opened dataset.
    other = root / "other"
    other.mkdir()
    shutil.copy(root / SUBSET / "02.png", other / "02.png")
    refused = client.post("/api/dataset/caption", json={"folder": FROG, "image": "other/02.png", "caption": "x"})
    assert refused.status_code == 403 and not (other / "02.txt").exists()
    # A caption file that is a symlink out of the dataset is not written through.
    target = tmp_path_factory.mktemp("elsewhere") / "target.txt"
    target.write_text("keep me")
    (root / SUBSET / "03.txt").unlink()
    (root / SUBSET / "03.txt").symlink_to(target)
    refused = client.post("/api/dataset/caption", json={"folder": FROG, "image": f"{SUBSET}/03.png", "caption": "x"})
    assert refused.status_code == 403 and target.read_text() == "keep me"


def test_bulk_tag_operations_rewrite_caption_files_only():
    assert dataset.edited_caption("a, sls frog, b", ",", "trigger_first", "sls frog") == "sls frog, a, b"
    assert dataset.edited_caption("a, B", ",", "remove", "b") == "a"
    assert dataset.edited_caption("a, b", ",", "replace", "b", "c") == "a, c"
    assert dataset.edited_caption("a", ",", "add", "sls frog", first=True) == "sls frog, a"
    assert dataset.edited_caption("sls frog, a", ",", "add", "SLS FROG") == "sls frog, a"


def test_bulk_edit_on_disk(root):
    result = _client(root).post("/api/dataset/tags", json={"folder": FROG, "operation": "add", "tag": "frog", "first": False})
    assert result.status_code == 200, result.text
    captioned = sorted(path.stem for path in (root / SUBSET).glob("*.txt"))
    assert sorted(Path(name).stem for name in result.json()["changed"]) == captioned
    assert all(path.read_text(encoding="utf-8").splitlines()[0].endswith(", frog") for path in (root / SUBSET).glob("*.txt"))
    # 10.png has no caption file: a bulk edit does not invent one (it would replace the folder words).
    assert not (root / SUBSET / "10.txt").exists()


def test_token_is_needed_on_every_request_off_localhost(root):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    client = _client(root, token="s3cret")
    assert client.get("/api/folders").status_code == 401
    assert client.get("/api/folders", params={"token": "wrong"}).status_code == 401
    assert client.get("/", params={"token": "s3cret"}).status_code == 200
    # The page's address carried the token once; the cookie it set carries it from then on.
    assert client.get("/api/folders").status_code == 200
    fresh = _client(root, token="s3cret")
    assert fresh.get("/api/folders", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert fresh.post("/api/runs/stop", json={"run": "x"}).status_code == 401


def test_localhost_refuses_foreign_hosts_and_cross_site_changes(root):
    client = _client(root)
    assert client.get("/api/folders", headers={"Host": "attacker.example"}).status_code == 403
    assert client.post("/api/dataset/tags", content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.post("/api/dataset/tags", json={}, headers={"Origin": "http://attacker.example"}).status_code == 403


def test_recipe_form_covers_the_schema_and_gives_the_cli_messages(root, lora_recipe_path):
    form = recipe_form.form(root, "shipped:sls_frog_lora.yaml")
    keys = {field["key"] for field in form["fields"]}
    assert {"train.max_steps", "data.buckets.min_side", "lora.rank", "sample.prompts", "data.subsets"} <= keys
    assert "hypernetwork.layer_structure" not in keys  # another method's section is not shown
    values = {field["key"]: field["value"] for field in form["fields"]}
    bad = {**values, "train.max_steps": "abc", "train.lr": "-1"}
    response = _client(root).post("/api/recipe/check", json={"recipe": "shipped:sls_frog_lora.yaml", "values": bad})
    with pytest.raises(Exception) as cli:
        load_recipe(lora_recipe_path, ["train.max_steps=abc", "train.lr=-1"])
    assert response.status_code == 400 and response.json()["error"] == str(cli.value)
    saved = recipe_form.save(root, "shipped:sls_frog_lora.yaml", {**values, "train.max_steps": "7"}, "mine")
    assert load_recipe(root / saved).train.max_steps == 7
    with pytest.raises(Exception, match="already exists"):
        recipe_form.save(root, "shipped:sls_frog_lora.yaml", values, "mine")


# --- the browser ---------------------------------------------------------------------------------


def _chromium() -> str:
    """Debian's Chromium (Playwright cannot download its own here); skip without it unless CI requires it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        reason = "no Chromium or no playwright: apt-get install chromium and pip install -e '.[test]' to run the browser test"
        if os.environ.get("SDTRAIN_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (SDTRAIN_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ui_server(root):
    """``sdtrain ui`` as a user starts it, on a free port; its training runs are stopped afterwards."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "trainer.cli", "ui", "--root", str(root), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            urllib.request.urlopen(address, timeout=1)
            break
        except OSError:
            assert server.poll() is None, server.stdout.read()
            time.sleep(0.1)
    yield address
    server.terminate()
    server.wait(timeout=30)
    for job in root.rglob("ui-job.json"):
        try:  # a run still going after a failed test: it runs in its own process group
            os.killpg(json.loads(job.read_text())["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def _shot(page, name: str) -> None:
    """With SDTRAIN_UI_SCREENSHOTS=docs/ui, the pictures in docs/ui.md."""
    folder = os.environ.get("SDTRAIN_UI_SCREENSHOTS")
    if folder:
        from PIL import Image

        page.evaluate("window.scrollTo(0, 0)")
        # 256 colours keep the pictures small (the page is flat colours; the samples stay recognisable).
        Image.open(io.BytesIO(page.screenshot())).quantize(256).save(Path(folder) / f"{name}.png", optimize=True)


def test_train_the_sls_frog_from_the_browser(root, ui_server):
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.set_default_timeout(30_000)
        page.goto(ui_server)

        # Data: open the quickstart dataset and give 10.png (which has no caption file) its caption.
        page.fill("#dataset-folder", FROG)
        page.fill("#dataset-resolution", "128")
        page.click("#dataset-open")
        caption = page.locator('textarea[data-image$="10.png"]')
        expect(caption).to_have_value("sls frog")
        expect(page.locator("#dataset-problems")).to_contain_text("none")
        caption.fill("sls frog, sitting on a stone, side view")
        page.locator(".card", has=caption).get_by_role("button", name="Save caption").click()
        expect(page.locator("#dataset-message")).to_contain_text("Saved the caption of 10.png")
        assert (root / SUBSET / "10.txt").read_text(encoding="utf-8") == "sls frog, sitting on a stone, side view\n"
        expect(page.locator("#dataset-tags")).to_contain_text("sitting on a stone (1)")
        _shot(page, "data")

        # Recipe: start from the shipped LoRA recipe; a wrong value gets the CLI's message; save a tiny run.
        page.click("nav button[data-page=recipe]")
        page.select_option("#recipe-choice", "shipped:sls_frog_lora.yaml")
        page.click("#recipe-load")
        page.fill('[data-key="train.max_steps"]', "many")
        expect(page.locator("#recipe-status")).to_contain_text("recipe key 'train.max_steps' has the wrong type")
        # A long run that the test stops, then resumes to a near end; small pictures, frequent samples and checkpoints.
        for key, value in {"train.max_steps": "100000", "data.resolution": "64", "data.buckets.min_side": "64",
                           "data.buckets.max_side": "128", "train.lr_warmup_steps": "0", "train.save_every_steps": "3",
                           "sample.every_steps": "3", "sample.steps": "2", "output.dir": "output/frog"}.items():
            page.fill(f'[data-key="{key}"]', value)
        expect(page.locator("#recipe-status")).to_contain_text("Valid. Changed:")
        expect(page.locator("#recipe-yaml")).to_contain_text("max_steps: 100000")
        page.fill("#recipe-name", "frog")
        page.click("#recipe-save")
        expect(page.locator("#recipe-status")).to_contain_text("Saved recipes/frog.yaml")
        _shot(page, "recipe")

        # Runs: start it, watch the loss curve and a sample appear, stop it.
        page.click("nav button[data-page=runs]")
        page.select_option("#run-recipe", "recipes/frog.yaml")
        page.click("#run-start")
        expect(page.locator("#run-state")).to_have_text("running", timeout=60_000)
        expect(page.locator("#samples img").first).to_be_visible(timeout=120_000)
        expect(page.locator("#loss-chart")).not_to_have_attribute("data-points", "0")
        page.wait_for_function("document.querySelector('#loss-chart').dataset.points > 3")
        expect(page.locator("#run-list")).to_contain_text("output/frog")
        _shot(page, "runs")
        page.click("#run-stop")
        expect(page.locator("#run-state")).to_have_text("stopped", timeout=60_000)
        stopped_at = complete_checkpoints(root / "output" / "frog")[-1][0]
        assert stopped_at < 100000

        # Resume it from its last checkpoint to a near end, and find the artifact listed.
        page.fill("#run-until", str(stopped_at + 3))
        page.click("#run-resume")
        expect(page.locator("#run-state")).to_have_text("finished", timeout=120_000)
        expect(page.locator("#artifacts")).to_contain_text("output/frog/sls_frog.safetensors")
        expect(page.locator("#run-log")).to_contain_text("Resumed from")
        assert (root / "output" / "frog" / "sls_frog.safetensors").is_file()
        assert complete_checkpoints(root / "output" / "frog")[-1][0] == stopped_at + 3
        browser.close()

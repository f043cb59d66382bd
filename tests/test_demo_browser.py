"""The demo in a real browser: Debian's chromium driven by Playwright, headless.

Loads the page, clicks the first example, asks, waits for the streamed answer and checks it: the
shipped model's expected answer when checkpoints/mmdiff-tiny exists, otherwise (tiny random model)
``model.generate``'s answer for the same input. Saves ``artifacts/demo.png``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from test_demo import SHIPPED, Served, app_module, make_tiny_model_dir

from mmdiff.model import MultimodalDiffusionLM

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 15_000

if not Path(CHROMIUM).is_file():
    pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium (.ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright missing: .venv/bin/pip install playwright (never `playwright install`)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    if (SHIPPED / "model.safetensors").is_file() and app_module.load_examples(SHIPPED):
        return SHIPPED
    return make_tiny_model_dir(tmp_path_factory.mktemp("browser"), tiny_tokenizer)


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=CHROMIUM_ARGS,
                                                       viewport={"width": 1280, "height": 960})
        try:
            yield context.new_page()
        finally:
            context.close()


def test_example_question_in_the_browser(model_dir, page):
    examples = app_module.load_examples(model_dir)
    row = next(i for i, e in enumerate(examples) if e.audio is None)  # a typed question
    example = examples[row]
    if model_dir == SHIPPED:
        expected = example.answer
    else:
        model = MultimodalDiffusionLM.from_pretrained(model_dir)
        expected = model.generate([example.question], images=[example.image], decode=app_module.ASK_DEFAULTS)[0].text
    served = Served(model_dir)
    try:
        page.goto(served.url)
        page.locator("#ask-examples tbody tr").nth(row).click(timeout=TIMEOUT_MS)
        sync_api.expect(page.locator("#question textarea")).to_have_value(example.question, timeout=TIMEOUT_MS)
        page.locator("#ask").click()
        sync_api.expect(page.locator("#stats")).to_contain_text("NFE", timeout=TIMEOUT_MS)
        assert page.locator("#answer textarea").input_value() == expected
        assert page.locator("#canvas .mm-tok[title^='fixed at step']").count() == app_module.ASK_DEFAULTS.sampler.gen_length
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    finally:
        served.close()

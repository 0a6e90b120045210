"""The user's main path in a real browser: configure, preview, train, stop, resume, export, chat."""

from __future__ import annotations

import re
import time


def _points(page) -> int:
    title = page.locator("#loss-plot .gtitle")
    if not title.count():
        return 0
    match = re.search(r"\((\d+) points\)", title.first.text_content() or "")
    return int(match.group(1)) if match else 0


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _set(page, name: str, value: str) -> None:
    box = page.locator(f"#cfg-{name} input, #cfg-{name} textarea").first
    box.fill(value)
    box.press("Tab")


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _status(page) -> str:
    return page.inner_text("#train-status")


def test_main_path(page, shots, app_url):
    # 1. Model & config: the tiny builtin model, enough steps to stop in the middle.
    model = page.locator("#cfg-model_name input")
    assert model.input_value() == "builtin:tiny-llama"
    _set(page, "max_steps", "120")
    _set(page, "run_name", "browser-main")
    _wait(lambda: "valid" in page.inner_text("#config-validation"), 20, "the config to validate")
    page.screenshot(path=str(shots / "config.png"), full_page=True)

    # 2. Dataset: the bundled instruction sample, previewed with its histogram.
    _tab(page, "Dataset")
    page.get_by_label("Bundled sample", exact=True).check()
    page.click("#preview-btn")
    page.wait_for_selector("#length-histogram .js-plotly-plot")
    summary = page.inner_text("#dataset-summary")
    assert "alpaca" in summary and "120 read" in summary
    assert page.locator("#mask-example-text .at-trained").count() >= 1
    page.screenshot(path=str(shots / "dataset.png"), full_page=True)

    # 3. Train: Start, watch the loss chart gain points.
    _tab(page, "Train")
    page.click("#estimate-btn")
    _wait(lambda: "Memory estimate" in page.inner_text("#memory-estimate"), 30, "the memory estimate")
    assert "fits" in page.inner_text("#memory-estimate")
    started = time.monotonic()
    page.click("#start-btn")
    _wait(lambda: _points(page) >= 1, 30, "the first loss point")
    first_point_s = time.monotonic() - started
    print(f"\nStart -> first loss point on the chart: {first_point_s:.2f} s")
    assert first_point_s < 5.0
    before = _points(page)
    _wait(lambda: _points(page) > before + 2, 60, "more loss points while training runs")

    # Stop: status 'stopped' and a checkpoint listed.
    page.click("#stop-btn")
    _wait(lambda: "stopped" in _status(page), 60, "status stopped")
    _wait(lambda: "checkpoint-" in page.inner_text("#checkpoints"), 10, "a checkpoint in the list")
    stopped_step = int(page.inner_text("#at-step"))
    assert 0 < stopped_step < 120
    page.screenshot(path=str(shots / "train_stopped.png"), full_page=True)

    # Resume: the step counter continues from the checkpoint, then the run finishes.
    page.click("#resume-btn")
    _wait(lambda: int(page.inner_text("#at-step")) > stopped_step, 60, "the step counter to continue")
    _wait(lambda: "finished" in _status(page), 180, "status finished")
    assert int(page.inner_text("#at-step")) == 120
    page.screenshot(path=str(shots / "train.png"), full_page=True)

    # 4. Export torch (and GGUF): verified.
    _tab(page, "Export")
    _wait(lambda: "browser-main" in page.locator("#export-run input").input_value(), 20, "the run to be selected")
    page.locator("#export-formats").get_by_label("gguf").check()
    page.click("#export-btn")
    _wait(
        lambda: page.inner_text("#export-summary").count("verified") >= 2, 120, "torch and gguf exports to be verified"
    )
    files = page.inner_text("#export-files")
    assert "model.safetensors" in files and "model-q8_0.gguf" in files and "Modelfile" in files
    page.screenshot(path=str(shots / "export.png"), full_page=True)

    # 5. Chat once: both the tuned and the base model answer.
    _tab(page, "Chat")
    _wait(lambda: "browser-main" in page.locator("#chat-run input").input_value(), 20, "the run to be selected")
    page.fill("#chat-message textarea", "Name three primary colours.")
    page.click("#chat-send")
    for pane in ("#chat-tuned", "#chat-base"):
        _wait(lambda pane=pane: page.locator(f"{pane} [data-testid='bot']").count() >= 1, 120, f"a reply in {pane}")
    assert "Name three primary colours." in page.inner_text("#chat-tuned")
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    # 6. Evaluate and Runs tabs render the finished run.
    _tab(page, "Evaluate")
    _wait(lambda: "browser-main" in page.locator("#eval-run input").input_value(), 20, "the run to be selected")
    page.click("#eval-btn")
    _wait(lambda: "perplexity" in page.inner_text("#eval-metrics"), 120, "evaluation metrics")
    page.screenshot(path=str(shots / "evaluate.png"), full_page=True)
    _tab(page, "Runs")
    _wait(lambda: "browser-main" in page.inner_text("#runs-table"), 20, "the run in the runs table")
    assert "finished" in page.inner_text("#runs-table")
    page.click("#runs-pick input")
    page.get_by_role("option", name=re.compile("browser-main")).first.click()
    _wait(lambda: page.locator("#report-link").count() >= 1, 20, "the report link")
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    # 7. The run report opens from that link: the curves and the base-vs-tuned metrics table.
    report = page.context.new_page()
    report.goto(app_url.rstrip("/") + page.get_attribute("#report-link", "href"))
    _wait(lambda: report.locator("#loss-chart .main-svg").count() >= 1, 30, "the report's loss chart")
    metrics = report.inner_text("table.metrics")
    assert "gen_exact_match" in metrics and "eval_loss" in metrics and "fine-tuned" in metrics
    assert report.locator("table.files td", has_text="model.safetensors").count() >= 1
    report.screenshot(path=str(shots / "report.png"), full_page=True)
    report.close()


def test_reload_redraws_the_whole_curve(page, app_url):
    _set(page, "max_steps", "400")
    _set(page, "run_name", "browser-reload")
    _tab(page, "Train")
    page.click("#start-btn")
    _wait(lambda: _points(page) >= 4, 60, "a few loss points")
    seen = _points(page)
    page.reload()
    page.wait_for_selector("#cfg-max_steps input")
    _tab(page, "Train")
    _wait(lambda: _points(page) >= seen, 15, "the chart to redraw every point logged before the reload")
    assert "browser-reload" in _status(page)
    page.click("#stop-btn")
    _wait(lambda: "stopped" in _status(page), 60, "the run to stop")


def test_a_sweep_ends_on_its_comparison_and_the_runs_tab_compares_its_trials(page, app_url):
    _set(page, "max_steps", "6")
    _set(page, "eval_generations", "0")
    _set(page, "run_name", "browser-sweep")
    _set(page, "sweep", "{learning_rate: [0.001, 0.02], lora_r: [4, 8]}")
    _wait(lambda: "valid" in page.inner_text("#config-validation"), 20, "the config to validate")
    _tab(page, "Train")
    page.click("#start-btn")
    _wait(lambda: "Sweep" in _status(page), 30, "the sweep to start")
    _wait(lambda: "Sweep: finished" in _status(page), 240, "the sweep to finish")
    assert all(f"trial-0{i}" in _status(page) for i in range(1, 5)) and "⭐" in _status(page)

    _tab(page, "Runs")
    page.click("#runs-refresh")
    page.click("#compare-sweep input")
    page.get_by_role("option", name=re.compile("browser-sweep")).first.click()
    _wait(lambda: "Best by eval_loss" in page.inner_text("#compare-view"), 30, "the comparison")
    view = page.inner_text("#compare-view")
    assert all(f"trial-0{i}" in view for i in range(1, 5))
    assert view.count("(best)") == 1 and "learning_rate" in view and "lora_r" in view
    _wait(lambda: page.locator("#compare-plot .js-plotly-plot").count() >= 1, 20, "the overlaid loss chart")
    assert page.locator("#compare-runs input:checked").count() == 4

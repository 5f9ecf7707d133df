"""`caffast report`: the page lists every image of a run, its thumbnails exist, and in a real headless
browser every picture loads, columns sort, the filter hides rows, and nothing is fetched from
outside the run folder."""

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffast.apps.cli import main
from caffast.eval.scenes import make_scene

SETTINGS = ["--arch", "demo", "--max-iter", "30"]
NAMES = ["a.png", "b.png", "sub/c.png", "sub/d & <e>.png", "f.png"]


class Page(HTMLParser):
    """The tags of a page: every img's src, every href, the text of the map table's image cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts_with_src: list[str] = []
        self.text = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "script" and "src" in attrs:
            self.scripts_with_src.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two runs of the same two-object scenes (one picture broken): with annotations and Grad-CAM, and without."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    lines = []
    for seed, name in enumerate(NAMES):
        scene = make_scene(seed, size=72, objects=2)
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((scene.image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(data / name)
        for label, mask in zip(scene.labels, scene.masks):
            rows, columns = np.nonzero(mask)
            lines.append(f'"{name}",{label},{columns.min()},{rows.min()},{columns.max() + 1},{rows.max() + 1}')
    (data / "broken.png").write_bytes(b"not a picture")
    (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    scored, plain = root / "scored", root / "plain"
    assert main(["run", str(data), "--out", str(scored), *SETTINGS, "--classes", "0,3", "--annotations",
                 str(root / "boxes.csv"), "--baseline", "gradcam"]) == 0  # fmt: skip
    assert main(["run", str(data), "--out", str(plain), *SETTINGS]) == 0
    for out in (scored, plain):
        assert main(["report", str(out)]) == 0
    return {"scored": scored, "plain": plain}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["scored", "plain"])
def test_the_page_lists_every_image_and_its_thumbnails_exist(runs, kind):
    out = runs[kind]
    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    words = "".join(page.text)
    for name in NAMES + ["broken.png"]:
        assert name in words, name
    done = [row for row in _rows(out) if row["status"] == "done"]
    methods = 2 if kind == "scored" else 1
    assert len(done) == len(NAMES) * (2 if kind == "scored" else 1)
    assert len(set(page.images)) == len(done) * methods  # one thumbnail per map and method
    thumbnails = {path.relative_to(out).as_posix() for path in (out / "report").iterdir()}
    assert set(page.images) == thumbnails
    for src in page.images:
        with Image.open(out / src) as picture:
            assert picture.format == "PNG" and max(picture.size) == 160
    assert not page.scripts_with_src and not any(":" in link for link in page.links + page.images)
    assert not re.search(r"https?:|//[a-z]", text.replace("'none'", ""))  # nothing outside the folder
    assert ("IoU" in words) == (kind == "scored") and ("Grad-CAM" in words) == (kind == "scored")


def test_the_thumbnails_draw_the_boxes_of_the_run(runs):
    """A thumbnail shows the annotated box in green where the index row says the box lies."""
    out = runs["scored"]
    row = next(row for row in _rows(out) if row["status"] == "done" and row["objects"] and
               any(obj["class"] == row["target"] for obj in row["objects"]))  # fmt: skip
    number = _rows(out).index(row)
    box = next(obj["box"] for obj in row["objects"] if obj["class"] == row["target"])
    with Image.open(out / "report" / f"{number:05d}.l2caf.png") as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    scale = 160 / 64
    x0, y0 = round(box[0] * scale), round(box[1] * scale)
    corner = pixels[y0 : y0 + 2, x0 : x0 + 2].reshape(-1, 3)
    assert any(abs(p - (0, 200, 0)).max() <= 1 for p in corner) or any(abs(p - (255, 215, 0)).max() <= 1 for p in corner)


def test_a_report_of_a_folder_that_is_no_run_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not the output folder of a caffast run" in capsys.readouterr().err


def test_the_report_is_made_again_without_stale_thumbnails(runs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(runs["scored"], out)
    (out / "report" / "99999.l2caf.png").write_bytes(b"left by an older report")
    assert main(["report", str(out)]) == 0
    assert not (out / "report" / "99999.l2caf.png").exists()
    assert sorted(p.name for p in (out / "report").iterdir()) == sorted(p.name for p in (runs["scored"] / "report").iterdir())


def _browser():
    """Headless Chromium driven by selenium, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    driver = shutil.which("chromedriver")
    if driver is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the network log
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_the_page_works_in_a_headless_browser(runs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    out = runs["scored"]
    browser = _browser()
    try:
        browser.get((out / "report.html").resolve().as_uri())
        images = browser.find_elements(By.TAG_NAME, "img")
        assert len(images) >= len(NAMES) * 2 * 2
        for image in images:  # the table's thumbnails load lazily: bring each into view
            browser.execute_script("arguments[0].scrollIntoView()", image)
            WebDriverWait(browser, 10).until(lambda _: browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0", image))  # fmt: skip

        table = browser.find_element(By.ID, "map-table")
        headers = [header.text for header in table.find_elements(By.CSS_SELECTOR, "thead th")]
        column = headers.index("L2-CAF IoU")

        def values() -> list[float]:
            cells = table.find_elements(By.CSS_SELECTOR, f"tbody tr td:nth-child({column + 1})")
            return [float(cell.get_attribute("data-value")) for cell in cells]

        before = values()
        table.find_elements(By.CSS_SELECTOR, "thead th")[column].click()
        assert values() == sorted(before) and values() != before
        table.find_elements(By.CSS_SELECTOR, "thead th")[column].click()
        assert values() == sorted(before, reverse=True)

        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        browser.find_element(By.ID, "filter").send_keys("sub/")
        shown = [row for row in rows if row.is_displayed()]
        assert len(shown) == 4 and all("sub/" in row.text for row in shown)  # two images, two classes each
        assert browser.find_element(By.ID, "shown").text == f"4 of {len(rows)} maps shown"
        browser.find_element(By.ID, "filter").clear()
        browser.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
        Select(browser.find_element(By.ID, "verdict")).select_by_value("miss")
        records = [row["localization"] for row in _rows(out) if row.get("localization")]
        misses = sum(record["gt_known_loc"] is False for record in records)  # None: the class has no box there
        assert sum(row.is_displayed() for row in rows) == misses < len(rows)

        # every request the page made, as Chromium's network log has it (file:// loads get no
        # performance entries), and the page's own resource entries: all inside the run folder
        events = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
        requests = [event["params"]["request"]["url"] for event in events if event["method"] == "Network.requestWillBeSent"]
        requests += browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        folder = out.resolve().as_uri() + "/"
        assert {image.get_attribute("src") for image in images} <= set(requests)  # the log saw every picture
        assert all(url.startswith(folder) for url in requests), requests
    finally:
        browser.quit()

"""`vitlora serve`: a real server on 127.0.0.1 (tiny adapters on one tiny base), a real HTTP client, a real browser."""

import base64
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import IMG_SIZE, TINY, make_adapter, make_workspace
from PIL import Image

from vitlora import AdapterError, LoRAConfig
from vitlora.inference import classify
from vitlora.serving import AdapterRegistry, BaseSpec, Limits, RequestError
from vitlora.serving.limits import check_top_k, decode_image

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": IMG_SIZE, **TINY}
TOKEN = "test-admin-token"
# Four tenants on one base: different targets, ranks and class lists.
TENANTS = {
    "fruit": (LoRAConfig(rank=4, targets=("q", "v")), ["apple", "banana", "cherry"]),
    "tools": (LoRAConfig(rank=2, alpha=8, targets=("qkv", "proj", "fc1", "fc2"), blocks=[-1]), list("wxyz")),
    "shoes": (LoRAConfig(rank=8, targets=("k", "fc2"), blocks=[0]), [f"s{i}" for i in range(6)]),
    "drinks": (LoRAConfig(rank=4, targets=("fc1",)), ["juice", "milk", "soda", "water", "yoghurt"]),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("serve"))
    (root / "adapters").mkdir()
    for seed, (name, (config, classes)) in enumerate(TENANTS.items()):
        make_adapter(root, root / "adapters" / f"{name}.safetensors", config, classes, seed=10 + seed)
    (root / "spare").mkdir()
    make_adapter(root, root / "spare" / "hats.safetensors", LoRAConfig(rank=2), ["cap", "beret", "fedora"], seed=30)
    make_adapter(root, root / "spare" / "dora.safetensors", LoRAConfig(rank=2, use_dora=True), ["a", "b"], seed=31)
    return root


def photos(workspace: Path) -> list[Path]:
    return sorted((workspace / "data" / "val").rglob("*.png"))


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def offline(workspace: Path, name: str, path: Path, top_k: int) -> list[tuple[str, float]]:
    """`vitlora classify` of one file with one adapter: the answer the server must give."""
    key = (workspace, name, path)
    if key not in _OFFLINE:  # one classify run per adapter and file: each run builds its model
        adapter = next(workspace.glob(f"*/{name}.safetensors"))
        [row] = classify(adapter, [path], weights=str(workspace / "base.safetensors"), top_k=10)
        _OFFLINE[key] = list(zip(row["labels"], row["probabilities"], strict=True))
    return _OFFLINE[key][:top_k]


_OFFLINE: dict = {}


def assert_same_predictions(answer: dict, expected: list[tuple[str, float]]) -> None:
    got = [(p["label"], p["probability"]) for p in answer["predictions"]]
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert max(abs(p - q) for (_, p), (_, q) in zip(got, expected, strict=True)) <= 1e-5


# --- limits and the registry, in process ---------------------------------------------------------


def test_decode_image_refuses_bad_payloads_with_a_status_and_one_line():
    limits = Limits(max_image_bytes=50_000)
    photo = png_bytes(Image.new("RGB", (40, 30), (200, 30, 30)))
    assert decode_image(base64.b64encode(photo).decode(), limits).size == (40, 30)
    assert decode_image("data:image/png;base64," + base64.b64encode(photo).decode(), limits).size == (40, 30)
    bomb = png_bytes(Image.new("1", (9000, 8000)))  # 72 M pixels in a few KB
    cases = [
        ("not base64!", 400, "not valid base64"),
        ("", 400, "empty"),
        (base64.b64encode(b"hello, not an image").decode(), 400, "image: not a recognised image format"),
        (base64.b64encode(photo[: len(photo) // 2]).decode(), 400, "image: corrupt or truncated"),
        (base64.b64encode(bomb).decode(), 400, "decompression-bomb sized"),
        (base64.b64encode(os.urandom(60_000)).decode(), 413, "over the limit of 50000"),
    ]
    for payload, status, message in cases:
        with pytest.raises(RequestError, match=message) as caught:
            decode_image(payload, limits)
        assert caught.value.status == status
    for bad in (0, -1, 101, True, 2.5, "3"):
        with pytest.raises(RequestError, match="top_k: must be an integer from 1 to 100") as caught:
            check_top_k(bad, Limits())
        assert caught.value.status == 422


def test_a_mixed_batch_is_one_trunk_pass_and_equals_offline_classify(workspace):
    registry = AdapterRegistry(BaseSpec(MODEL, MODEL_KWARGS, str(workspace / "base.safetensors")))
    assert registry.apply({n: str(workspace / "adapters" / f"{n}.safetensors") for n in TENANTS}) == {}
    trunk_passes = []
    registry.multi.model.patch_embed.register_forward_hook(lambda module, args, out: trunk_passes.append(len(out)))
    from vitlora.datasets import eval_transform
    from vitlora.images import load_rgb

    transform = eval_transform(MODEL, IMG_SIZE)
    files = photos(workspace)[:8]
    names = [list(TENANTS)[i % 4] for i in range(8)] + ["gone"]
    top_k = [1, 2, 3, 4, 5, 3, 2, 1, 1]
    results = registry.classify([transform(load_rgb(f)) for f in [*files, files[0]]], names, top_k)
    assert trunk_passes == [8]  # eight images, four adapters, one pass of the shared trunk
    assert registry.stats.forward_passes == 1 and registry.stats.most_adapters_in_a_batch == 4
    for name, path, k, result in zip(names, files, top_k, results, strict=False):
        expected = offline(workspace, name, path, k)
        assert [label for label, _ in result] == [label for label, _ in expected]
        assert max(abs(p - q) for (_, p), (_, q) in zip(result, expected, strict=True)) <= 1e-5
    assert isinstance(results[-1], RequestError) and results[-1].status == 404


def test_a_refused_adapter_file_keeps_the_others(workspace):
    registry = AdapterRegistry(BaseSpec(MODEL, MODEL_KWARGS, str(workspace / "base.safetensors")))
    broken = workspace / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    wanted = {"fruit": str(workspace / "adapters" / "fruit.safetensors")}
    wanted |= {"dora": str(workspace / "spare" / "dora.safetensors"), "broken": str(broken)}
    refused = registry.apply(wanted)
    assert set(refused) == {"dora", "broken"}
    assert "dora.safetensors: adapters with DoRA magnitudes cannot be routed per sample" in refused["dora"]
    assert refused["broken"].startswith(str(broken))
    assert list(registry.describe()) == ["fruit"]
    with pytest.raises(AdapterError, match="DoRA"):
        registry.add("dora", wanted["dora"])
    registry.apply({})
    assert registry.describe() == {}


# --- a real server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(workspace):
    """`vitlora serve` in a subprocess on a free loopback port, stopped (SIGINT) after the module's tests."""
    port = free_port()
    command = [
        sys.executable, "-m", "vitlora.cli", "serve", str(workspace / "adapters"),
        "--weights", str(workspace / "base.safetensors"), "--port", str(port), "--accelerator", "cpu",
        "--max-batch-size", "16", "--batch-timeout", "0.05", "--max-image-bytes", "200000", "--admin-token", TOKEN,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(workspace / "server.log", "w+")  # noqa: SIM115
    # its own process group, so teardown also stops the LitServe workers it spawns
    process = subprocess.Popen(
        command, cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # two interpreters import torch: ~30 s, minutes on a loaded machine
    while True:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            kill_group(process)
            log.seek(0)
            pytest.fail(f"the server did not start:\n{log.read()}")
        time.sleep(0.2)
    yield url
    process.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    kill_group(process)  # a slow shutdown or an orphaned worker must not outlive the tests
    log.close()


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group may have exited already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def predict(url: str, name: str, path: Path, top_k: int = 3) -> requests.Response:
    return requests.post(f"{url}/predict", json={"adapter": name, "image": encoded(path), "top_k": top_k}, timeout=30)


def test_64_concurrent_requests_over_4_adapters_equal_offline_classify_in_mixed_batches(server, workspace):
    files = photos(workspace)
    jobs = [(list(TENANTS)[i % 4], files[i % len(files)], 1 + i % 5) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: predict(server, *job), jobs))
    assert [answer.status_code for answer in answers] == [200] * 64
    for (name, path, k), answer in zip(jobs, answers, strict=True):
        assert answer.json()["adapter"] == name
        assert_same_predictions(answer.json(), offline(workspace, name, path, k))
    [stats] = requests.get(f"{server}/stats", timeout=5).json()["workers"]
    assert stats["images"] >= 64 and stats["forward_passes"] < stats["images"]
    assert stats["most_adapters_in_a_batch"] > 1  # requests for different adapters shared a forward pass


def test_explain_adds_the_explanation_sheet_as_a_png_and_keeps_the_predictions(server, workspace):
    import base64
    import io

    from PIL import Image

    path = photos(workspace)[0]
    body = {"adapter": "fruit", "image": encoded(path), "top_k": 2, "explain": True}
    answer = requests.post(f"{server}/predict", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    assert_same_predictions(answer.json(), offline(workspace, "fruit", path, 2))
    sheet = base64.b64decode(answer.json()["explanation_png"])
    assert sheet.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(sheet)) as picture:
        assert picture.width > 400 and picture.height > 200
    plain = predict(server, "fruit", path, 2).json()
    assert "explanation_png" not in plain
    refused = requests.post(f"{server}/predict", json={**body, "explain": "yes"}, timeout=30)
    assert refused.status_code == 422 and "explain" in refused.json()["error"]


def test_health_adapter_list_and_the_page(server, workspace):
    assert requests.get(f"{server}/health", timeout=5).status_code == 200
    listed = requests.get(f"{server}/adapters", timeout=5).json()["adapters"]
    assert [a["name"] for a in listed] == sorted(TENANTS)
    fruit = next(a for a in listed if a["name"] == "fruit")
    assert fruit["classes"] == TENANTS["fruit"][1]
    assert Path(fruit["file"]) == (workspace / "adapters" / "fruit.safetensors").resolve()
    page = requests.get(server, timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<select" in page.text


def test_bad_requests_get_a_4xx_with_one_line_of_json_and_the_server_keeps_serving(server, workspace):
    photo = photos(workspace)[0]
    good = {"adapter": "fruit", "image": encoded(photo), "top_k": 2}
    truncated = base64.b64encode(photo.read_bytes()[:100]).decode()
    bomb = base64.b64encode(png_bytes(Image.new("1", (9000, 8000)))).decode()
    huge = base64.b64encode(os.urandom(210_000)).decode()
    cases = [
        ({**good, "adapter": "hats"}, 404, "unknown adapter 'hats'"),
        ({"adapter": "fruit", "top_k": 2}, 422, "image: Field required"),
        ({**good, "image": "%%%"}, 400, "not valid base64"),
        ({**good, "image": base64.b64encode(b"GIF89a nonsense").decode()}, 400, "image: not a recognised image"),
        ({**good, "image": base64.b64encode(b"plain text").decode()}, 400, "not a recognised image format"),
        ({**good, "image": truncated}, 400, "corrupt or truncated"),
        ({**good, "image": bomb}, 400, "decompression-bomb"),
        ({**good, "image": huge}, 413, "over the limit of 200000"),
        ({**good, "top_k": 0}, 422, "top_k: must be an integer"),
        ({**good, "top_k": "five"}, 422, "top_k: Input should be a valid integer"),
        ({**good, "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ]
    with ThreadPoolExecutor(len(cases) + 1) as pool:  # bad requests batched with a good one
        bad = pool.map(lambda case: requests.post(f"{server}/predict", json=case[0], timeout=30), cases)
        fine = pool.submit(requests.post, f"{server}/predict", json=good, timeout=30)
        for (_, status, message), answer in zip(cases, bad, strict=True):
            assert answer.status_code == status, answer.text
            assert message in answer.json()["error"] and "\n" not in answer.text.strip()
        assert fine.result().status_code == 200
    not_json = requests.post(f"{server}/predict", data=b"{not json", timeout=10)
    assert not_json.status_code == 422 and "error" in not_json.json()
    over_body = requests.post(f"{server}/predict", data=b"x" * 400_000, timeout=10)
    assert over_body.status_code == 413 and "error" in over_body.json()
    assert_same_predictions(predict(server, "fruit", photo, 2).json(), offline(workspace, "fruit", photo, 2))


def test_admin_adds_and_removes_adapters_while_requests_are_in_flight(server, workspace):
    hats, dora = workspace / "spare" / "hats.safetensors", workspace / "spare" / "dora.safetensors"
    admin = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(f"{server}/adapters", json={"path": str(hats)}, timeout=10).status_code == 401
    wrong = requests.delete(f"{server}/adapters/fruit", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and "Authorization: Bearer" in wrong.json()["error"]
    refused = requests.post(f"{server}/adapters", json={"path": str(dora)}, headers=admin, timeout=30)
    assert refused.status_code == 422 and "dora.safetensors: adapters with DoRA magnitudes" in refused.json()["error"]
    assert requests.post(f"{server}/adapters", json={"path": "/no/such.safetensors"}, headers=admin).status_code == 404

    files = photos(workspace)
    with ThreadPoolExecutor(8) as pool:
        load = [
            pool.submit(predict, server, name, files[i % len(files)]) for i in range(40) for name in ("fruit", "shoes")
        ]
        added = requests.post(f"{server}/adapters", json={"path": str(hats)}, headers=admin, timeout=30)
        removed = requests.delete(f"{server}/adapters/tools", headers=admin, timeout=30)
        assert all(future.result().status_code == 200 for future in load)  # nothing in flight was dropped
    assert added.status_code == 200 and added.json()["classes"] == ["cap", "beret", "fedora"]
    assert removed.status_code == 200
    assert requests.post(f"{server}/adapters", json={"path": str(hats)}, headers=admin).status_code == 409
    listed = requests.get(f"{server}/adapters", timeout=10).json()["adapters"]
    assert [a["name"] for a in listed] == ["drinks", "fruit", "hats", "shoes"]
    assert_same_predictions(predict(server, "hats", files[0]).json(), offline(workspace, "hats", files[0], 3))
    assert predict(server, "tools", files[0]).status_code == 404
    tools = workspace / "adapters" / "tools.safetensors"
    restored = requests.post(f"{server}/adapters", json={"path": str(tools)}, headers=admin, timeout=30)
    assert restored.status_code == 200


def test_admin_endpoints_are_off_without_a_token():
    from vitlora.serving.api import AdminEndpoints

    with pytest.raises(RequestError, match="admin endpoints are off") as caught:
        AdminEndpoints(catalog=None, token=None).authorize("Bearer anything")
    assert caught.value.status == 403


# --- the page in a real browser ------------------------------------------------------------------


def chromium_driver():
    """Headless Debian chromium through Selenium, or a skip when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,800", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def grocery_photo(path: Path) -> Path:
    """A banana-yellow blob on a shelf-grey background, 160 x 120."""
    image = Image.new("RGB", (160, 120), (170, 170, 160))
    pixels = image.load()
    for x in range(30, 130):
        for y in range(40, 80):
            if ((x - 80) / 50) ** 2 + ((y - 60) / 20) ** 2 < 1:
                pixels[x, y] = (235, 205, 60)
    image.save(path)
    return path


def test_the_page_classifies_an_uploaded_photo_in_a_real_browser(server, workspace):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = chromium_driver()
    photo = grocery_photo(workspace / "banana.png")
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "adapter")).options) >= 4)
        Select(driver.find_element(By.ID, "adapter")).select_by_value("fruit")
        driver.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .label")) == 3)
        labels = [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#results .label")]
        shown = [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#results .probability")]
        expected = offline(workspace, "fruit", photo, 3)
        assert labels == [label for label, _ in expected]
        assert shown == [f"{100 * p:.1f}%" for _, p in expected]
        driver.find_element(By.ID, "explain").click()  # ticked: the photo on show again, with its explanation
        WebDriverWait(driver, 300).until(lambda d: d.find_element(By.ID, "explanation").is_displayed())
        assert driver.find_element(By.ID, "explanation").get_attribute("src").startswith("data:image/png;base64,")
        screenshot = os.environ.get("VITLORA_SCREENSHOT")
        if screenshot:
            driver.save_screenshot(screenshot)
    finally:
        driver.quit()

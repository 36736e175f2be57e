"""The agiqa package against the fixture models: results and errors per image, streaming,
metadata, provider and set-up errors, in-memory inputs, the GIL, Ctrl-C, and parity with
`agiqa score` (set AGIQA_BIN to the CLI binary)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import agiqa
from agiqa import _ort
from conftest import encoded, model, picture

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.fixture(scope="module")
def three():
    return agiqa.Scorer(model("three_heads.onnx"), provider="cpu", batch_size=4, threads=1)


def test_good_and_bad_images_each_get_a_result_in_input_order(three, good_images, bad_images):
    bad_paths = [p for p, _ in bad_images]
    paths = good_images[:6] + bad_paths + good_images[6:]
    results = three.score(paths)
    assert [r["path"] for r in results] == paths
    for r in results:
        if r["path"] in bad_paths:
            assert set(r) == {"path", "error"} and r["error"], r
        else:
            assert set(r) == {"path", "scores"}, r
            assert list(r["scores"]) == ["quality", "alignment", "authenticity"]
            assert all(np.isfinite(v) for v in r["scores"].values())
    for path, mention in bad_images:
        error = next(r["error"] for r in results if r["path"] == path)
        if mention:
            assert mention in error, error
    # The scorer stays usable after bad images.
    assert "scores" in three.score(good_images[0])[0]


def test_bad_image_in_memory_raises_image_error_and_wrong_arrays_raise_input_error(three, bad_images):
    for path, _ in bad_images:
        if os.path.exists(path):
            with pytest.raises(agiqa.ImageError):
                three.score_image(Path(path).read_bytes())
    with pytest.raises(agiqa.InputError):
        three.score_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(agiqa.InputError):
        three.score_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(agiqa.InputError):
        three.score_image("not-an-image-object")
    with pytest.raises(agiqa.InputError):
        three.score_batch(np.zeros((2, 3, 5, 5), np.float32))


def test_pil_array_and_bytes_of_one_picture_agree_with_the_file(three, tmp_path):
    img = picture(77, 51, 5)
    path = tmp_path / "p.png"
    img.save(path)
    from_file = three.score(str(path))[0]["scores"]
    for x in (img, np.asarray(img), encoded(img, "PNG")):
        got = three.score_image(x)
        assert got.keys() == from_file.keys()
        for head in got:
            assert np.float32(got[head]) == np.float32(from_file[head]), (type(x), head)
    batch = three.score_batch(np.stack([np.asarray(img)] * 3))
    assert batch.shape == (3, 3) and batch.dtype == np.float32
    assert np.array_equal(batch[1], np.array(list(from_file.values()), np.float32))


def test_float_batch_is_scored_as_computed_by_hand():
    scorer = agiqa.Scorer(model("mean_f32.onnx"), provider="cpu")
    r = scorer.image_size
    values = np.array([0, 77, 128, 255], np.float32)
    x = ((values[:, None, None, None] / 255.0 - CLIP_MEAN[None, :, None, None]) / CLIP_STD[None, :, None, None])
    x = np.broadcast_to(x, (4, 3, r, r)).astype(np.float32)
    expected = 0.5 * x.mean(axis=(1, 2, 3)) + 2.5
    got = scorer.score_batch(x)
    assert got.shape == (4, 1)
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-5)


def test_iter_score_streams_every_image_once_and_stops_early(good_images):
    scorer = agiqa.Scorer(model("mean_f32.onnx"), provider="cpu", batch_size=1, workers=1)
    many = good_images * 20
    seen = [r["path"] for r in scorer.iter_score(many)]
    assert sorted(seen) == sorted(many)
    # The first result arrives long before a full run would end, and closing stops the run.
    start = time.perf_counter()
    stream = scorer.iter_score(many * 10)
    first = next(stream)
    first_at = time.perf_counter() - start
    stream.close()
    assert "scores" in first
    full = scorer.score(many)
    assert len(full) == len(many)
    assert first_at < 0.5, first_at


def test_metadata_describes_the_model(three):
    meta = three.metadata
    assert meta["backbone"] == "fixture"
    assert meta["heads"] == three.heads == ["quality", "alignment", "authenticity"]
    assert meta["score_scale"]["alignment"]["max"] == 100.0 or meta["score_scale"]["alignment"]["max"] == 5.0
    assert set(meta["dataset"]) == set(meta["heads"])
    assert meta["preprocessing"]["image_size"] == three.image_size == 32
    assert meta["input"] == three.input_name == "pixel_values"
    assert "quantisation" in meta and meta["quantisation"] in (None, "fp32", "fp16")
    assert {"metrics", "protocol", "raw"} <= set(meta)
    assert three.provider == "cpu"


def test_bad_models_raise_model_error(tmp_path):
    for name in ["no_metadata.onnx", "wrong_dtype.onnx", "two_inputs.onnx", "heads_mismatch.onnx"]:
        with pytest.raises(agiqa.ModelError):
            agiqa.Scorer(model(name), provider="cpu")
    with pytest.raises(agiqa.ModelError, match="nowhere"):
        agiqa.Scorer(tmp_path / "nowhere.onnx", provider="cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(agiqa.ModelError):
        agiqa.Scorer(junk, provider="cpu")


def test_provider_errors_are_explicit():
    with pytest.raises(agiqa.ProviderError, match="unknown execution provider"):
        agiqa.Scorer(model("mean_f32.onnx"), provider="tpu")
    with pytest.raises(agiqa.ProviderError, match="one GPU"):
        agiqa.Scorer(model("mean_f32.onnx"), provider="cuda", device_id=[0, 1])
    if not _ort.is_gpu_build():
        # A CPU-only ONNX Runtime: asking for CUDA is an error, never a silent CPU run ...
        with pytest.raises(agiqa.ProviderError, match="cuda"):
            agiqa.Scorer(model("mean_f32.onnx"), provider="cuda")
        # ... while auto falls back and says why.
        auto = agiqa.Scorer(model("mean_f32.onnx"), provider="auto")
        assert auto.provider == "cpu" and auto.provider_notes


def test_missing_onnxruntime_names_both_extras(monkeypatch):
    monkeypatch.setattr(_ort, "_distribution", lambda: None)
    with pytest.raises(agiqa.OnnxRuntimeError) as err:
        _ort.find_library()
    assert "agiqa[cpu]" in str(err.value) and "agiqa[gpu]" in str(err.value)
    monkeypatch.setattr(_ort, "_distribution", lambda: ("onnxruntime", "1.20.0"))
    with pytest.raises(agiqa.OnnxRuntimeError, match="too old"):
        _ort.find_library()


def test_found_library_is_the_installed_wheels():
    lib = _ort.find_library()
    assert lib and "onnxruntime" in lib and Path(lib).is_file()
    assert Path(lib).parent.name == "capi"


def test_rust_panic_is_the_packages_error_not_pyo3s():
    with pytest.raises(agiqa.InternalError, match="boom") as err:
        agiqa._agiqa._panic_for_tests("boom")
    assert isinstance(err.value, agiqa.AgiqaError)
    assert "PanicException" not in type(err.value).__name__


def _count_while(call):
    """How often another Python thread ran while `call` was running."""
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.05)
    before = counter[0]
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    during = counter[0] - before
    stop.set()
    thread.join()
    return during, seconds


def test_gil_is_released_during_inference_and_decoding(good_images):
    scorer = agiqa.Scorer(model("conv224.onnx"), provider="cpu", threads=1)
    r = scorer.image_size
    batch = np.random.default_rng(0).integers(0, 255, (64, r * 2, r * 2, 3), dtype=np.uint8)
    # One Rust call that takes a while: a thread that needs the GIL still runs throughout.
    during, seconds = _count_while(lambda: scorer.score_batch(batch))
    assert seconds > 0.05, seconds
    assert during > 10000, (during, seconds)
    during, seconds = _count_while(lambda: scorer.score(good_images * 8))
    assert during > 10000, (during, seconds)


def test_ctrl_c_interrupts_a_long_score(tmp_path, good_images):
    script = tmp_path / "long.py"
    script.write_text(
        "import sys, agiqa\n"
        f"s = agiqa.Scorer({model('conv224.onnx')!r}, provider='cpu', batch_size=1, workers=1, threads=1)\n"
        f"paths = {good_images!r} * 400\n"
        "print('started', flush=True)\n"
        "try:\n"
        "    s.score(paths)\n"
        "    print('finished', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(3)\n"
    )
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "started"
    time.sleep(1.0)
    sent = time.perf_counter()
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 3, (child.returncode, out)
    assert "interrupted" in out
    assert time.perf_counter() - sent < 5


def _cli(args, **kw):
    binary = os.environ.get("AGIQA_BIN")
    if not binary:
        pytest.skip("AGIQA_BIN (the agiqa CLI) is not set")
    env = dict(os.environ, ORT_DYLIB_PATH=_ort.find_library())
    return subprocess.run([binary, *args], env=env, capture_output=True, text=True, **kw)


def test_scores_equal_the_cli_on_the_same_files_and_model(tmp_path, good_images, bad_images):
    paths = good_images + [p for p, _ in bad_images]
    for name in ["three_heads.onnx", "mean_u8.onnx", "conv224.onnx"]:
        out = tmp_path / f"{name}.jsonl"
        run = _cli(["score", "--model", model(name), "--provider", "cpu", "--out", str(out), *paths])
        assert run.returncode == 1, run.stderr  # the bad images fail
        cli = {json.loads(l)["path"]: json.loads(l) for l in out.read_text().splitlines()}
        ours = agiqa.Scorer(model(name), provider="cpu").score(paths)
        assert len(cli) == len(ours) == len(paths)
        for r in ours:
            c = cli[r["path"]]
            assert ("error" in r) == ("error" in c), (r, c)
            if "error" in r:
                assert r["error"] == c["error"]
                continue
            assert r["scores"].keys() == c["scores"].keys()
            for head, value in r["scores"].items():
                # The CLI prints the shortest f32 text: as f32 the two are the same number.
                assert abs(value - c["scores"][head]) <= 1e-6 * max(1.0, abs(value)), (head, value)
                assert np.float32(value) == np.float32(c["scores"][head])


def test_python_m_agiqa_score_mirrors_the_cli(tmp_path, good_images, bad_images):
    folder = str(Path(good_images[0]).parent)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(p for p, _ in bad_images[:2]) + "\n")
    common = ["--model", model("three_heads.onnx"), "--provider", "cpu", folder, "--list", str(lst)]
    cli_out, py_out = tmp_path / "cli.csv", tmp_path / "py.csv"
    cli = _cli(["score", *common, "--out", str(cli_out)])
    py = subprocess.run(
        [sys.executable, "-m", "agiqa", "score", *common, "--out", str(py_out)],
        capture_output=True, text=True,
    )
    assert cli.returncode == py.returncode == 1, (cli.stderr, py.stderr)
    assert "failed" in py.stderr
    cli_lines, py_lines = cli_out.read_text().splitlines(), py_out.read_text().splitlines()
    assert cli_lines[0] == py_lines[0] == "path,quality,alignment,authenticity,error"
    assert sorted(cli_lines[1:]) == sorted(py_lines[1:])
    assert len(py_lines) == 1 + len(good_images) + 2
    # --resume appends nothing when everything is recorded.
    again = subprocess.run(
        [sys.executable, "-m", "agiqa", "score", *common, "--out", str(py_out), "--resume"],
        capture_output=True, text=True,
    )
    assert again.returncode == 0, again.stderr
    assert py_out.read_text().splitlines() == py_lines

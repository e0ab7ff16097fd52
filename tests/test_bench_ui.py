"""``kedit bench ui``: its pure parts here; the browser check end to end where Playwright and Chromium are installed."""

from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from pathlib import Path

import pytest

from kedit.app.bench_ui import DEFAULT_CHROMIUM, VIEWPORT, Check, UIError, bench_ui, missing_requirements, png_size, result

HAVE_BROWSER = importlib.util.find_spec("playwright") is not None and DEFAULT_CHROMIUM.is_file()


def _png(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_png_size_reads_the_header_and_refuses_other_files(tmp_path):
    assert png_size(_png(tmp_path / "a.png", 1400, 900)) == (1400, 900)
    (tmp_path / "b.png").write_bytes(b"\xff\xd8\xff\xe0 a jpeg, not a png at all")
    assert png_size(tmp_path / "b.png") is None
    (tmp_path / "c.png").write_bytes(b"")
    assert png_size(tmp_path / "c.png") is None


def test_a_check_passes_only_with_200_its_text_and_no_error():
    good = Check("runs_table", "http://x/#/a", ["Runs"], "01.png", status=200, found=True)
    assert good.ok
    assert not Check("a", "u", ["t"], "s", status=404, found=True).ok
    assert not Check("a", "u", ["t"], "s", status=None, found=True).ok  # no response to the page load
    assert not Check("a", "u", ["t"], "s", status=200, found=False, missing=["t"]).ok
    assert not Check("a", "u", ["t"], "s", status=200, found=True, error="TimeoutError: x").ok


def test_the_result_is_ok_only_when_every_check_is_and_is_json():
    a = Check("runs_table", "http://x/#/a", ["Runs"], "01.png", status=200, found=True, seconds=1.5, size=[1400, 900])
    b = Check("registered_model", "http://x/#/m", ["m", "production"], "04.png", status=200, found=False, missing=["production"])
    res = result([a, b], mlflow="3.17.2", timings_s={"total": 9.0})
    assert res["ok"] is False
    assert [c["ok"] for c in res["checks"]] == [True, False]
    assert res["checks"][1]["missing"] == ["production"]
    assert res["mlflow"] == "3.17.2" and res["timings_s"] == {"total": 9.0}
    assert json.loads(json.dumps(res)) == res
    assert result([a], x=1)["ok"] is True
    assert result([])["ok"] is False  # nothing checked is no pass


def test_missing_playwright_or_chromium_says_how_to_install_in_one_line(tmp_path):
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    assert missing_requirements(chromium, has_module=lambda name: True) is None

    msg = missing_requirements(chromium, has_module=lambda name: False)
    assert "playwright" in msg and 'pip install -e ".[ui]"' in msg and "\n" not in msg

    msg = missing_requirements(tmp_path / "nowhere", has_module=lambda name: True)
    assert str(tmp_path / "nowhere") in msg and "apt-get install chromium" in msg and "\n" not in msg

    chromium.chmod(0o644)  # there, but not executable
    assert "Chromium" in missing_requirements(chromium, has_module=lambda name: True)


def test_bench_ui_refuses_before_doing_any_work_without_a_browser(tmp_path):
    with pytest.raises(UIError, match="apt-get install chromium"):
        bench_ui(tmp_path / "out", tmp_path / "r.json", chromium=tmp_path / "no-chromium")
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not HAVE_BROWSER, reason=f"needs the ui extra (playwright) and Chromium at {DEFAULT_CHROMIUM}")
def test_the_ui_serves_every_printed_link_and_shows_it(tmp_path):
    out, json_path = tmp_path / "ui", tmp_path / "ui" / "bench_ui.json"
    res = bench_ui(out, json_path)

    assert json.loads(json_path.read_text()) == res
    names = [c["name"] for c in res["checks"]]
    assert names == ["runs_table", "stream_charts", "rejected_attempt", "registered_model"]
    for c in res["checks"]:
        assert c["status"] == 200, c
        assert c["found"] and not c["missing"], c
        assert c["error"] is None, c
        shot = Path(c["screenshot"])
        assert shot.parent == out and shot.stat().st_size > 10_000
        assert png_size(shot) == (VIEWPORT["width"], VIEWPORT["height"])
    assert res["ok"]
    assert res["stream"]["quarantined"] == 1 and res["stream"]["accepted"] == 4
    assert res["chromium"] and res["timings_s"]["total"] > 0

"""Benchmark: prepare throughput on full-size DX radiographs (2560 x 2048, 16-bit), per transfer syntax.

Decoding is the one cost of `vet_ext.ingestion.prepare` that scales with the archive. Three parts:
1. every installed decoder on one file of each syntax (pydicom's plugins, imagecodecs, Pillow's
   openjpeg at a reduced resolution), timed alone and checked against pydicom's reference pixels;
2. where a worker's time goes on prepare's own path (read, decode, display, resize, write);
3. prepare end to end with 1 and 2 worker processes: images/s, per worker, and the scaling.
Files are copies of one synthetic radiograph with new UIDs, encoded by the project's own writer
(`vet_ext.ingestion.dicom_write`), so every file costs the same. Target: >= 15 images/s per core
for every syntax with one worker; two workers >= 1.7x one.

    .venv/bin/python bench/prepare_throughput.py [--files 16] [--workers 1 2] [--out bench_out/prepare]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.pixels import get_decoder, pixel_array  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless  # noqa: E402

from machine import cpu_model, print_load_after, print_run_header, print_targets  # noqa: E402  (bench/machine.py)
from vet_ext.ingestion import decoders  # noqa: E402
from vet_ext.ingestion.cache import ShardWriter, to_cache_image  # noqa: E402
from vet_ext.ingestion.dicom import _display  # noqa: E402
from vet_ext.ingestion.dicom_write import write_dicom  # noqa: E402
from vet_ext.ingestion.prepare import PrepareConfig, prepare  # noqa: E402

ROWS, COLUMNS = 2560, 2048
TARGET_PER_CORE = 15.0
TARGET_SCALING = 1.7
SYNTAXES = {
    "uncompressed": ExplicitVRLittleEndian,
    "JPEG Lossless SV1": JPEGLosslessSV1,
    "JPEG 2000 lossless": JPEG2000Lossless,
    "RLE": RLELossless,
    "JPEG-LS lossless": JPEGLSLossless,
}


def radiograph_like(seed: int = 0) -> np.ndarray:
    """Smooth anatomy-scale structure plus quantum-like noise: compresses like a real radiograph."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    body = 20000 + 15000 * np.sin(xx / 300) * np.cos(yy / 400)
    return np.clip(body + rng.normal(0, 500, (ROWS, COLUMNS)), 0, 65535).astype(np.uint16)


def write_tree(root: Path, syntax: str, n_files: int, pixels: np.ndarray) -> float:
    """n_files DICOM files (two views per study) of the same pixels; returns seconds spent."""
    started = time.perf_counter()
    template = write_dicom(
        root / "template.dcm", pixels, study_uid="1.2.826.0.1.1", sop_uid="1.2.826.0.1.1.1", view_position="LL",
        photometric="MONOCHROME2", bits_stored=16, transfer_syntax=syntax, WindowCenter=20000, WindowWidth=30000,
        PixelSpacing=[0.15, 0.15],
    )  # fmt: skip
    dataset = pydicom.dcmread(template)
    template.unlink()
    for index in range(n_files):
        study = f"1.2.826.0.1.{index // 2 + 2}"
        dataset.StudyInstanceUID = study
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = f"{study}.{index % 2}"
        dataset.ViewPosition = ("LL", "VD")[index % 2]
        (root / study).mkdir(exist_ok=True)
        dataset.save_as(root / study / f"{index % 2}.dcm", enforce_file_format=True)
    return time.perf_counter() - started


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: imports, first-call allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def candidate_decoders(syntax: UID, cache_size: int) -> dict[str, Callable[[pydicom.Dataset], np.ndarray]]:
    """Every installed way to decode this syntax, by name; the first is prepare's own choice."""
    candidates = {"prepare's choice": lambda ds: decoders.decode_pixels(ds, cache_size).values}
    if syntax.is_compressed:
        for plugin in sorted(get_decoder(syntax).available_plugins):
            candidates[f"pydicom.{plugin}"] = lambda ds, plugin=plugin: pixel_array(ds, decoding_plugin=plugin)
        for codec in decoders.FAST_CODECS:
            if syntax in codec.syntaxes and codec.available():
                candidates[codec.name] = lambda ds, codec=codec: decoders._frames(ds, codec.decode)
    else:
        candidates["pydicom"] = pixel_array
    return candidates


def decoder_table(path: Path, syntax: UID, cache_size: int, repeats: int) -> list[dict]:
    reference = pixel_array(pydicom.dcmread(path))
    chosen = decoders.decode_pixels(pydicom.dcmread(path), cache_size)
    rows = []
    for name, decode in candidate_decoders(syntax, cache_size).items():
        ds = pydicom.dcmread(path)
        try:
            values = decode(ds)
            seconds = _median_seconds(lambda: decode(ds), repeats)
        except Exception as exc:  # noqa: BLE001 - a plugin that cannot decode this file is a row, not a crash
            rows.append({"decoder": name, "error": f"{type(exc).__name__}: {exc}"[:120]})
            continue
        full = values.shape == reference.shape
        rows.append({
            "decoder": name if name != "prepare's choice" else f"prepare's choice ({chosen.decoder})",
            "ms": round(seconds * 1000, 1), "images_per_s": round(1 / seconds, 1),
            "pixels": "identical" if full and np.array_equal(values, reference) else
                      ("DIFFERENT" if full else f"reduced to {values.shape[0]}x{values.shape[1]}"),
        })  # fmt: skip
    return rows


def stage_breakdown(path: Path, cache_size: int, repeats: int, scratch: Path) -> dict[str, float]:
    """Milliseconds per image in each step of prepare's worker path, run one after the other."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    decoded = decoders.decode_pixels(ds, cache_size)
    invert = ds.PhotometricInterpretation == "MONOCHROME1"
    shown = _display(decoded.values, ds, invert)
    full_shape = (int(ds.Rows), int(ds.Columns))
    cached = to_cache_image(shown, cache_size, level=decoded.level, full_shape=full_shape)
    writer = ShardWriter(scratch / "shards", scratch / "state", {"bench": True})
    stages = {
        "read": lambda: pydicom.dcmread(io.BytesIO(path.read_bytes())),
        "decode": lambda: decoders.decode_pixels(pydicom.dcmread(io.BytesIO(raw)), cache_size),
        "display": lambda: _display(decoded.values, ds, invert),
        "resize": lambda: to_cache_image(shown, cache_size, level=decoded.level, full_shape=full_shape),
        "write": lambda: writer.append_image(cached),
    }
    timings = {name: round(_median_seconds(run, repeats) * 1000, 1) for name, run in stages.items()}
    parse_ms = _median_seconds(lambda: pydicom.dcmread(io.BytesIO(raw)), repeats) * 1000
    timings["decode"] = round(max(0.0, timings["decode"] - parse_ms), 1)  # its parse is already in "read"
    writer.close()
    timings["total"] = round(sum(timings.values()), 1)
    return timings


def end_to_end(raw: Path, out: Path, workers: int, cache_size: int, count: int) -> dict:
    config = PrepareConfig(out=out, dicom_root=raw, workers=workers, cache_size=cache_size, progress=False)
    started = time.perf_counter()
    summary = prepare(config)
    wall = time.perf_counter() - started
    counts = summary["counts"]
    assert counts["images"] == count and counts["errors"] == 0, counts
    return {"workers": workers, "images_per_s": counts["images_per_s"],
            "per_worker": round(counts["images_per_s"] / workers, 2), "with_outputs_per_s": round(count / wall, 2),
            "decoders": summary["decoders"]}  # fmt: skip


def write_figure(results: dict, path: Path) -> None:
    names = list(results["syntaxes"])
    fig, (stages_ax, rate_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = np.zeros(len(names))
    for stage in ("read", "decode", "display", "resize", "write"):
        values = np.array([results["syntaxes"][n]["stages_ms"][stage] for n in names])
        stages_ax.barh(names, values, left=bottom, label=stage)
        bottom += values
    stages_ax.axvline(1000 / TARGET_PER_CORE, color="k", linestyle="--", label=f"{TARGET_PER_CORE:.0f} images/s")
    stages_ax.set_xlabel("ms per image, one core")
    stages_ax.set_title("where a worker's time goes (prepare's path)")
    stages_ax.legend(fontsize=8)
    width = 0.8 / max(1, len(results["workers"]))
    for k, workers in enumerate(results["workers"]):
        rates = [next(r["images_per_s"] for r in results["syntaxes"][n]["end_to_end"] if r["workers"] == workers)
                 for n in names]  # fmt: skip
        rate_ax.bar(np.arange(len(names)) + k * width, rates, width, label=f"{workers} worker(s)")
    rate_ax.set_xticks(np.arange(len(names)) + width * (len(results["workers"]) - 1) / 2, names, rotation=20, fontsize=8)
    rate_ax.set_ylabel("images/s, prepare end to end")
    rate_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = [f"command: `{results['command']}`", f"machine: {results['machine']}", "",
             "| syntax | decoder | ms / image | images/s (decode only) | pixels |", "|---|---|---|---|---|"]  # fmt: skip
    for name, entry in results["syntaxes"].items():
        for row in entry["decoders"]:
            if "error" in row:
                lines.append(f"| {name} | {row['decoder']} | - | - | fails: {row['error']} |")
            else:
                lines.append(f"| {name} | {row['decoder']} | {row['ms']} | {row['images_per_s']} | {row['pixels']} |")
    lines += ["", "| syntax | read | decode | display | resize | write | total ms | images/s per core |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in results["syntaxes"].items():
        s = entry["stages_ms"]
        lines.append(f"| {name} | {s['read']} | {s['decode']} | {s['display']} | {s['resize']} | {s['write']} | "
                     f"{s['total']} | {1000 / s['total']:.1f} |")  # fmt: skip
    lines += ["", "| syntax | workers | images/s | per worker | scaling vs 1 |", "|---|---|---|---|---|"]
    for name, entry in results["syntaxes"].items():
        one = entry["end_to_end"][0]["images_per_s"]
        for row in entry["end_to_end"]:
            lines.append(f"| {name} | {row['workers']} | {row['images_per_s']} | {row['per_worker']} | "
                         f"{row['images_per_s'] / one:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=16, help="files per syntax for the end-to-end runs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--syntax", nargs="+", choices=list(SYNTAXES), default=list(SYNTAXES))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per decoder and stage (median)")
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench_out/prepare"))
    args = parser.parse_args()
    print_run_header(pydicom)
    pixels = radiograph_like()
    machine = f"{os.cpu_count()} cores, {cpu_model()}"
    results = {"command": " ".join(["python", *sys.argv]), "machine": machine, "workers": args.workers, "syntaxes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.syntax:
            syntax = UID(SYNTAXES[name])
            raw = Path(tmp) / name.replace(" ", "_")
            raw.mkdir()
            written = write_tree(raw, syntax, args.files, pixels)
            first = sorted(raw.rglob("*.dcm"))[0]
            mib = first.stat().st_size / 2**20
            print(f"\n{name}: {args.files} files of {ROWS}x{COLUMNS} 16-bit, {mib:.1f} MiB each (written in {written:.1f} s)")
            entry = {"file_mib": round(mib, 2)}
            entry["decoders"] = decoder_table(first, syntax, args.cache_size, args.repeats)
            for row in entry["decoders"]:
                print("  " + (f"{row['decoder']:<48} fails: {row['error']}" if "error" in row else
                              f"{row['decoder']:<48} {row['ms']:>8.1f} ms  {row['pixels']}"))  # fmt: skip
            entry["stages_ms"] = stage_breakdown(first, args.cache_size, args.repeats, Path(tmp) / f"stages-{raw.name}")
            print(f"  stages (ms): {entry['stages_ms']}")
            entry["end_to_end"] = [end_to_end(raw, Path(tmp) / f"out-{raw.name}-{w}", w, args.cache_size, args.files)
                                   for w in args.workers]  # fmt: skip
            for row in entry["end_to_end"]:
                print(f"  prepare, {row['workers']} worker(s): {row['images_per_s']} images/s "
                      f"({row['per_worker']} per worker)")  # fmt: skip
            results["syntaxes"][name] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    write_figure(results, args.out / "prepare_throughput.png")
    print(f"\nwrote {args.out}/results.json, results.md, prepare_throughput.png")
    one_worker = {n: e["end_to_end"][0]["per_worker"] for n, e in results["syntaxes"].items()}
    slowest = min(one_worker, key=one_worker.get)
    targets = [(f">= {TARGET_PER_CORE:.0f} images/s per core, every syntax", one_worker[slowest] >= TARGET_PER_CORE,
                f"slowest {slowest} {one_worker[slowest]}")]  # fmt: skip
    if len(args.workers) > 1:
        scaling = {n: e["end_to_end"][1]["images_per_s"] / e["end_to_end"][0]["images_per_s"]
                   for n, e in results["syntaxes"].items()}  # fmt: skip
        worst = min(scaling, key=scaling.get)
        targets.append((f"{args.workers[1]} workers >= {TARGET_SCALING}x one", scaling[worst] >= TARGET_SCALING,
                        f"lowest {worst} {scaling[worst]:.2f}x"))  # fmt: skip
    print_targets(*targets)
    print_load_after()
    return 0


if __name__ == "__main__":
    sys.exit(main())

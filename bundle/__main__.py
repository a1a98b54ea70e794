"""Command line of the bundle's tooling: ``python -m bundle <verb> [options]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def _demo_data(args: argparse.Namespace) -> int:
    from bundle.demo_data import write_demo_data

    path = write_demo_data(args.out, num_samples=args.num_samples, seed=args.seed, size=args.size)
    print(f"demo data written: {path}")
    return 0


def _datalist(args: argparse.Namespace) -> int:
    from bundle.datalist import DatalistError, build_datalist, write_datalist

    root = Path(args.root)
    out = Path(args.out) if args.out else (root.parent if root.is_file() else root) / "datalist.json"
    try:
        datalist = build_datalist(
            args.layout, root, skip_bad=args.skip_bad, val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, seed=args.seed, encoding_errors=args.encoding_errors,
            image_column=args.image_column, mask_column=args.mask_column or None, report_column=args.report_column,
        )
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(datalist.summary())
    print(f"datalist written: {write_datalist(datalist, out)}")
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    from bundle.bench import data_pipeline_throughput, print_data_table

    rows = data_pipeline_throughput(
        args.datalist, num_samples=args.num_samples, batch_size=args.batch_size, workers=args.workers,
        text_encoder_dir=args.text_encoder_dir,
    )
    print_data_table(rows)
    return 0


def _overrides(items: list[str] | None) -> dict:
    """``--set ID=VALUE ...`` → config overrides; values are read as JSON when they parse, else kept as text."""
    overrides = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _bench_agreement(args: argparse.Namespace) -> int:
    from bundle.bench import inference_agreement

    inference_agreement(args.datalist, args.ckpt, split=args.split, network=args.network,
                        overrides=_overrides(args.set), limit=args.limit)
    return 0


def _bench_profile(args: argparse.Namespace) -> int:
    from bundle.bench import machine, profile_step

    print(f"{time.strftime('%Y-%m-%d %H:%M')} · {machine()}")
    print(profile_step(args.network, args.path, size=args.size, train_batch=args.train_batch, steps=args.steps,
                       rows=args.rows, overrides=_overrides(args.set)))
    return 0


def _bench_switches(args: argparse.Namespace) -> int:
    from bundle.bench import machine, switch_ablation

    print(f"{time.strftime('%Y-%m-%d %H:%M')} · {machine()}")
    switch_ablation(args.network, size=args.size, train_batch=args.train_batch, rounds=args.rounds,
                    compile_variant=args.compile, overrides=_overrides(args.set))
    return 0


def _machine() -> str:
    from bundle.bench import machine

    return machine()


def _bench_model(args: argparse.Namespace) -> int:
    from bundle.bench import conv_peak, json_rows, network_costs, print_network_table
    from scripts.io import atomic_write_text

    overrides = _overrides(args.set)
    paths = ("fast", "baseline") if args.baseline else ("fast",)
    rows = network_costs(args.networks, paths=paths, size=args.size, batch_sizes=tuple(args.batch_sizes),
                         train_batch=args.train_batch, repeats=args.repeats, warmup=args.warmup, device=args.device,
                         overrides=overrides, timing=not args.params_only)
    peak = None if args.params_only else conv_peak(device=args.device, repeats=args.repeats)
    print_network_table(rows, peak)
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": _machine(), "conv_peak_gflops": peak,
                                                 "rows": json_rows(rows)}, indent=2, default=str))
        print(f"\nwritten: {args.json}")
    return 0


def _zones_check(args: argparse.Namespace) -> int:
    from bundle.zones_check import ground_truth_consistency

    r = ground_truth_consistency(args.datalist, args.split, left_is_image_left=not args.radiological)
    print(f"{r['split']}: {r['images']} masks with a located report ({r['no_location']} reports name no zone)")
    for key in ("outside_named", "missed_zones"):
        print(f"ground truth {key}: mean {r[key]['mean']:.4f}, median {r[key]['median']:.4f}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from bundle.results import results_table, seed_table

    try:
        table = seed_table if args.seeds else results_table
        print(table(args.metrics, baseline=args.baseline))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _freetext(args: argparse.Namespace) -> int:
    from bundle.freetext import write_freetext_datalists, write_handwritten_datalist

    try:
        free, none = write_freetext_datalists(args.datalist, args.split)
        hand = write_handwritten_datalist(args.datalist, args.split)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{free}\n{none}\n{hand}")
    return 0


def _infer_pacs(args: argparse.Namespace) -> int:
    from bundle.infer_pacs import infer_pacs, infer_pacs_archive, reasons

    common = dict(formats=args.formats, config_files=args.config_file, ckpt=args.ckpt, device=args.device,
                  overrides=_overrides(args.set))
    if args.dicomweb or args.dimse:
        from bundle.pacs import (Credentials, DicomWebArchive, DimseArchive, PacsError, parse_dimse_address,
                                 parse_query)

        try:
            if args.dicomweb:
                archive = DicomWebArchive(args.dicomweb, Credentials.from_env(args.credentials_env),
                                          verify=False if args.insecure else (args.ca_bundle or True))
            else:
                archive = DimseArchive(*parse_dimse_address(args.dimse), calling_aet=args.calling_aet)
            run = infer_pacs_archive(archive, args.output, parse_query(args.query), args.reports, **common)
        except (PacsError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        source = archive.url
    else:
        run = infer_pacs(args.input, args.output, **common)
        source = args.input
    print(run.summary())
    if run.failures:
        print(reasons(run))
    print(f"summary: {Path(args.output) / 'summary.csv'}")
    if run.done + run.already_done == 0:
        print(f"error: no series of {source} was segmented", file=sys.stderr)
        return 1
    return 0 if run.failed == 0 else 1


def _pack(args: argparse.Namespace) -> int:
    from bundle.pack import pack

    print(f"bundle zip written: {pack(args.root, args.out, max_model_mb=args.max_model_mb or None)}")
    return 0


def _ship(args: argparse.Namespace) -> int:
    from bundle.ship import ship

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = {}
    for item in args.extra or []:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            print(f"error: --extra {item!r}: expected NAME=DATALIST", file=sys.stderr)
            return 2
        extra[name] = path
    metrics = ship(args.run_dir, args.dataset_dir, datalist=args.datalist, extra_datalists=extra,
                   dataset=args.dataset, root=args.root, max_model_mb=args.max_model_mb or None,
                   overrides=args.overrides, tracking_uri=args.tracking_uri)
    print(json.dumps(metrics, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from bundle.export import export

    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated ONNX initializer
    result = export(args.format, out=args.out, root=args.root, ckpt=args.ckpt, image=args.image, report=args.report)
    print(result.summary())
    return 0


def _device_check(args: argparse.Namespace) -> int:
    from bundle.device_check import device_check, prepare_payload, write_json

    if args.prepare:
        print(f"payload written: {prepare_payload(args.prepare, args.qata, num_images=args.num_images)}")
        return 0
    if not args.datalist:
        print("error: --datalist is required (or --prepare DIR)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the compute-path line
    results = device_check(args.datalist, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                           workers=args.workers, encoder_size=args.encoder_size, size=args.size, device=args.device,
                           text_encoder_dir=args.text_encoder_dir, overrides=_overrides(args.set))
    if args.json:
        write_json(results, args.json)
        print(f"written: {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand (verb) per tool."""
    parser = argparse.ArgumentParser(prog="python -m bundle", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    demo = sub.add_parser("demo-data", help="write the embedded synthetic demo data set and its datalist")
    demo.add_argument("--out", required=True, help="destination folder")
    demo.add_argument("--num-samples", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=224, help="image side in pixels")
    demo.set_defaults(func=_demo_data)

    dl = sub.add_parser("datalist", help="index a data set (folder, lvit, csv or pacs layout) into a datalist JSON")
    dl.add_argument("layout", choices=["folder", "lvit", "csv", "pacs"])
    dl.add_argument("--root", required=True, help="the data folder (the CSV file for the csv layout)")
    dl.add_argument("--out", help="datalist file (default: datalist.json in the data folder)")
    dl.add_argument("--skip-bad", action="store_true", help="skip, log and count bad entries instead of failing")
    dl.add_argument("--val-fraction", type=float, default=0.15, help="when the layout has no split")
    dl.add_argument("--test-fraction", type=float, default=0.15, help="when the layout has no split")
    dl.add_argument("--seed", type=int, default=0)
    dl.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                    help="non-UTF-8 reports: fail (strict) or replace the bad bytes with a warning")
    dl.add_argument("--image-column", default="image", help="csv layout")
    dl.add_argument("--mask-column", default="mask", help="csv layout; empty for an inference-only datalist")
    dl.add_argument("--report-column", default="report", help="csv layout")
    dl.set_defaults(func=_datalist)

    bench = sub.add_parser("bench", help="benchmarks that print figures (see docs/performance.md)")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    bd = bench_sub.add_parser("data", help="samples/s of the training input pipeline against a plain PNG load")
    bd.add_argument("--datalist", required=True, help="a datalist JSON with a training list (e.g. of QaTa)")
    bd.add_argument("--num-samples", type=int, default=800)
    bd.add_argument("--batch-size", type=int, default=8)
    bd.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    bd.add_argument("--text-encoder-dir", default=None, help="tokenizer folder (default: the packaged MiniLM)")
    bd.set_defaults(func=_bench_data)
    bm = bench_sub.add_parser("model", help="parameters, FLOPs, step time, latency and peak memory per network")
    bm.add_argument("--networks", nargs="+", default=["tmca", "tmca_image_only", "unet"],
                    help="names of configs/networks/*.yaml; ratios are against the first")
    bm.add_argument("--size", type=int, default=224)
    bm.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="inference batch sizes")
    bm.add_argument("--train-batch", type=int, default=8)
    bm.add_argument("--repeats", type=int, default=10)
    bm.add_argument("--warmup", type=int, default=3)
    bm.add_argument("--device", default="cpu")
    bm.add_argument("--set", nargs="+", metavar="ID=VALUE",
                    help="config overrides for every network, e.g. image_encoder_size=tiny (values as JSON or text)")
    bm.add_argument("--baseline", action="store_true",
                    help="also time the plain fp32 contiguous path of each network (no autocast, channels-last, "
                         "compile, fused optimizer or text cache) in a fresh process of the same run")
    bm.add_argument("--json", metavar="FILE", help="write one object per network and path to FILE")
    bm.add_argument("--params-only", action="store_true",
                    help="parameters and FLOPs only (no timing): quick, and exact on a busy machine")
    bm.set_defaults(func=_bench_model)
    bp = bench_sub.add_parser("profile", help="torch.profiler table of the top operators of the training step")
    bp.add_argument("--network", default="tmca")
    bp.add_argument("--path", choices=["fast", "baseline"], default="fast")
    bp.add_argument("--size", type=int, default=224)
    bp.add_argument("--train-batch", type=int, default=8)
    bp.add_argument("--steps", type=int, default=3)
    bp.add_argument("--rows", type=int, default=25)
    bp.add_argument("--set", nargs="+", metavar="ID=VALUE", help="config overrides (values as JSON or text)")
    bp.set_defaults(func=_bench_profile)
    bs = bench_sub.add_parser("switches", help="training step of the fast path with each of its switches turned off")
    bs.add_argument("--network", default="tmca")
    bs.add_argument("--size", type=int, default=224)
    bs.add_argument("--train-batch", type=int, default=8)
    bs.add_argument("--rounds", type=int, default=6)
    bs.add_argument("--compile", action="store_true", help="add a torch.compile variant (minutes of compilation)")
    bs.add_argument("--set", nargs="+", metavar="ID=VALUE", help="config overrides (values as JSON or text)")
    bs.set_defaults(func=_bench_switches)
    ba = bench_sub.add_parser("agreement", help="masks of the fast path against the fp32 path on real images")
    ba.add_argument("--datalist", required=True, help="a datalist JSON (e.g. of QaTa-COV19)")
    ba.add_argument("--ckpt", default="models/model.pt", help="weights (default: the shipped model)")
    ba.add_argument("--split", default="validation")
    ba.add_argument("--network", default="tmca", help="configs/networks/<name>.yaml the weights belong to")
    ba.add_argument("--limit", type=int, help="first N entries only")
    ba.add_argument("--set", nargs="+", metavar="ID=VALUE", help="config overrides (values as JSON or text)")
    ba.set_defaults(func=_bench_agreement)
    zc = sub.add_parser("zones-check", help="report consistency of the ground-truth masks (the zone grid's fit)")
    zc.add_argument("--datalist", required=True)
    zc.add_argument("--split", default="validation")
    zc.add_argument("--radiological", action="store_true", help="reports use the patient's left (image right)")
    zc.set_defaults(func=_zones_check)
    rs = sub.add_parser("results", help="markdown table of evaluation metrics.json files (docs/results.md)")
    rs.add_argument("metrics", nargs="+", help="<run>/eval_val/metrics.json files, e.g. runs/qata/*_1ep/eval_val/metrics.json")
    rs.add_argument("--baseline", help="a run (with --seeds: a row) name: adds each row's dice_mean difference to it")
    rs.add_argument("--seeds", action="store_true",
                    help="runs named <row>_s<seed>: one row each, mean ± sd over seeds and the per-seed Dice")
    rs.set_defaults(func=_results)
    ft = sub.add_parser("freetext",
                        help="held-out free-text, hand-written and no-report copies of a datalist's validation split")
    ft.add_argument("datalist", help="the datalist JSON; the copies are written beside it")
    ft.add_argument("--split", default="validation")
    ft.set_defaults(func=_freetext)
    ip = sub.add_parser("infer-pacs", help="segment every series of a DICOM export: DICOM SEG, overlays, summary.csv")
    where = ip.add_mutually_exclusive_group(required=True)
    where.add_argument("--input", help="the export folder (any nesting, any file names)")
    where.add_argument("--dicomweb", metavar="URL", help="a DICOMweb server's root: query, retrieve, store SEGs back")
    where.add_argument("--dimse", metavar="AET@HOST:PORT", help="an archive over DIMSE (C-FIND, C-GET, C-STORE)")
    ip.add_argument("--query", help="with --dicomweb/--dimse: study filters (QIDO-RS attributes, C-FIND keys), "
                                    "e.g. 'ModalitiesInStudy=CR&StudyDate=20261130'")
    ip.add_argument("--reports", help="with --dicomweb/--dimse: folder of report sidecars <StudyInstanceUID>.txt "
                                      "(or <AccessionNumber>.txt) for studies without an SR")
    ip.add_argument("--calling-aet", default="LGSEG", help="with --dimse: this bundle's AE title (default LGSEG)")
    ip.add_argument("--credentials-env", default="PACS", metavar="PREFIX",
                    help="credentials from <PREFIX>_TOKEN[_FILE] or <PREFIX>_USER + <PREFIX>_PASSWORD[_FILE] "
                         "(default PACS); never from the command line")
    ip.add_argument("--ca-bundle", help="CA certificates to verify the server's TLS certificate with")
    ip.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (logged as a warning)")
    ip.add_argument("--output", required=True, help="results folder; a rerun skips the series already done")
    ip.add_argument("--formats", nargs="+", default=["dicom_seg", "overlay"],
                    choices=["mask", "probability", "overlay", "dicom_seg"])
    ip.add_argument("--config-file", nargs="+", help="inference configs merged in order (default configs/inference.yaml)")
    ip.add_argument("--ckpt", help="weights (default models/model.pt)")
    ip.add_argument("--device", help="e.g. cpu or cuda:0 (default: the config's)")
    ip.add_argument("--set", nargs="+", metavar="ID=VALUE", help="config overrides (values as JSON or text)")
    ip.set_defaults(func=_infer_pacs)
    pk = sub.add_parser("pack", help="the bundle as a MONAI bundle zip, <out>/<name>_v<version>.zip (docs/export.md)")
    pk.add_argument("--out", default="dist", help="destination folder")
    pk.add_argument("--root", default=".", help="bundle root")
    pk.add_argument("--max-model-mb", type=float, default=25.0, help="refuse a larger models/model.pt (0: no limit)")
    pk.set_defaults(func=_pack)
    sh = sub.add_parser("ship", help="a training run's best network as models/model.pt (float16), evaluated, with "
                                     "its figures as eval_metrics in configs/metadata.json")
    sh.add_argument("run_dir", help="the training run folder (models/model.pt, checkpoints, mlruns.db)")
    sh.add_argument("--dataset-dir", required=True, help="the evaluation's dataset_dir")
    sh.add_argument("--datalist", help="datalist whose validation split is evaluated (default <dataset-dir>/datalist.json)")
    sh.add_argument("--extra", nargs="+", metavar="NAME=DATALIST",
                    help="more datalists to evaluate, e.g. without_reports=runs/qata/datalist_noreport.json")
    sh.add_argument("--dataset", help="what eval_metrics says the figures are")
    sh.add_argument("--root", default=".", help="bundle root to ship into")
    sh.add_argument("--max-model-mb", type=float, default=25.0, help="refuse a larger model.pt (0: no limit)")
    sh.add_argument("--tracking-uri", help="the run's MLflow store (default <run_dir>/mlruns.db)")
    # after `--`: monai.bundle overrides for every evaluation, e.g. `-- --device cuda:0` (split off in main)
    sh.set_defaults(func=_ship, overrides=[])
    ex = sub.add_parser("export", help="the inference network as ONNX or TorchScript, checked against PyTorch")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    ex.add_argument("--out", help="file to write (default models/model.onnx or models/model.ts)")
    ex.add_argument("--root", default=".", help="bundle root")
    ex.add_argument("--ckpt", help="weights (default models/model.pt)")
    ex.add_argument("--image", help="an image to export with and check on (default: a random one)")
    ex.add_argument("--report", help="its report (default: a QaTa-style report)")
    ex.set_defaults(func=_export)

    dc = sub.add_parser("device-check", help="TMCA training steps at the papers' size: samples/s, step time, peak "
                                             "GPU memory, data-wait fraction, first and last loss")
    dc.add_argument("--datalist", help="a datalist JSON with a training list (QaTa-COV19's train split)")
    dc.add_argument("--steps", type=int, default=60)
    dc.add_argument("--warmup", type=int, default=10, help="first steps left out of the timings")
    dc.add_argument("--batch-size", type=int, default=32)
    dc.add_argument("--workers", type=int, nargs="+", default=[8], help="loader worker counts to compare")
    dc.add_argument("--encoder-size", default="tiny", help="ConvNeXt size (tiny: the papers')")
    dc.add_argument("--size", type=int, default=224)
    dc.add_argument("--device", help="default: cuda:0 when available, else cpu")
    dc.add_argument("--text-encoder-dir", help="a local text encoder folder (default: the packaged MiniLM)")
    dc.add_argument("--set", nargs="+", metavar="ID=VALUE", help="config overrides (values as JSON or text)")
    dc.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    dc.add_argument("--prepare", metavar="DIR", help="instead: write the payload a bare GPU machine needs to DIR")
    dc.add_argument("--qata", default="../shared/data/qata", help="with --prepare: the QaTa-COV19 folder")
    dc.add_argument("--num-images", type=int, default=128, help="with --prepare: training images to include")
    dc.set_defaults(func=_device_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # what follows `--` is passed on as it is (monai.bundle arguments start with -- too, which argparse would read)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else None
    parser = build_parser()
    args = parser.parse_args(argv[: argv.index("--")] if rest is not None else argv)
    if rest is not None:
        if not hasattr(args, "overrides"):
            parser.error(f"{argv[0]} takes no arguments after --")
        args.overrides = rest
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied DICOM module
    # per request: pynetdicom logs each association and query dataset, dicomweb-client each request
    for name in ("pynetdicom", "dicomweb_client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

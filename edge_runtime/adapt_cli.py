"""`edge-runtime adapt`: learn good parts / store defects into a new bundle version on the device (no torch)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_runtime.operator_page.config import OPERATOR_LEARN_MAX


def add_adapt_parser(sub, func) -> None:
    d = sub.add_parser("adapt", help="learn good images into the memory bank and store defects, as a new bundle "
                                     "version (no torch); prints the new threshold and how each image scores",
                       description="Write NEW_BUNDLE: BUNDLE whose memory bank also covers the --good images and "
                                   "which stores the --defect images as calibration defects. The threshold never "
                                   "rises; a defect that would fall under it lowers it. BUNDLE is left unchanged.")
    d.add_argument("bundle", help="the bundle to start from (left unchanged: roll back by loading it again)")
    d.add_argument("--good", nargs="+", default=[], metavar="IMAGE",
                   help="good parts to learn, e.g. false rejects (default: [], none)")
    d.add_argument("--defect", nargs="+", default=[], metavar="IMAGE",
                   help="defective parts to store as calibration defects; they must stay NG (default: [], none)")
    d.add_argument("--out", required=True, help="folder of the new bundle version (required; must not exist or be empty)")
    d.add_argument("--who", default=None, help="name recorded in the audit log (default: None, the login user)")
    d.add_argument("--audit-log", default=None,
                   help="JSON-lines audit log to append to (default: None, bundle_audit.jsonl beside --out)")
    d.add_argument("--signing-key", default=None,
                   help="station-local ed25519 private key (PEM) to sign the version with; required when BUNDLE "
                        "is signed (default: None)")
    d.add_argument("--coverage-radius", type=float, default=None,
                   help="add learned patches until each is this close to the bank (default: None, the median "
                        "cross-fitted good score)")
    d.add_argument("--confirm-above-limit", action="store_true",
                   help=f"learn --good images even if they score above {OPERATOR_LEARN_MAX:g} x the threshold (the "
                        "operator page's default page.operator_learn_max): you confirm these parts are good, and the "
                        "audit log records which (default: off, such an image is refused: a part that far above the "
                        "threshold is more likely a defect, and learning it makes it and others like it OK)")
    d.add_argument("--dry-run", action="store_true",
                   help="print the effect (scores before/after, new threshold) and write nothing (default: off)")
    from edge_runtime.cli import _threads   # 1-256, as check's: 999999 started that many threads (probe 100)
    from edge_runtime.lines_config import MAX_THREADS

    d.add_argument("--threads", type=_threads, default=2,
                   help=f"onnxruntime and search threads, 1-{MAX_THREADS} (default: 2)")
    d.set_defaults(func=func)


def run_adapt(a: argparse.Namespace) -> int:
    from edge_runtime.bank_adapt import AUDIT_FILE, AdaptError, InputImage, prepare
    from edge_runtime.bundle import Bundle, BundleError
    from edge_runtime.decode import ImageError
    from edge_runtime.features import FeatureError

    try:
        bundle = Bundle.load(a.bundle)
        learn = [InputImage.from_file(p, bundle.shift_16bit) for p in a.good]
        defects = [InputImage.from_file(p, bundle.shift_16bit) for p in a.defect]
        plan = prepare(bundle, learn, defects, coverage_radius=a.coverage_radius, threads=a.threads)
    except (AdaptError, BundleError, ImageError, FeatureError) as exc:   # an image of another size, a bad model
        print(f"edge-runtime adapt: {exc}", file=sys.stderr)
        return 2
    for name, ch in plan.changes.items():
        print(f"[{name}] bank {ch.bank_before} -> {ch.bank_after} vectors (+{ch.bank_after - ch.bank_before}); "
              f"threshold {ch.threshold_before:.4f} -> {ch.threshold_after:.4f}"
              + (f"; review {ch.review_before:.4f} -> {ch.review_after:.4f}" if ch.review_before else ""))
        frr = ch.expected_false_reject
        if frr.get("n"):
            print(f"[{name}] cross-fitted good scores at or above the new threshold: {frr['count']}/{frr['n']}")
        for i in ch.images:
            print(f"[{name}] {i.kind:<13} {i.before:9.4f} {i.verdict_before:<6} -> {i.after:9.4f} {i.verdict_after:<6} {i.name}")
    for c in plan.conflicts:
        print(f"conflict: {c}", file=sys.stderr)
    print(f"prepared in {plan.seconds:.2f} s")
    # The operator page's limit, on the command line too: an NG part taught as good here turned OK silently.
    over = plan.above_learn_limit(OPERATOR_LEARN_MAX)
    for o in over:
        print(f"edge-runtime adapt: {o['image']}: scores {o['score']:.4f}, {o['ratio']:.2f} x the {o['variant']} "
              f"threshold {o['threshold']:.4f}, above the limit of {OPERATOR_LEARN_MAX:g} x for learning a part as "
              "good (further above, a part is more likely a defect): "
              + ("learned as confirmed by --confirm-above-limit" if a.confirm_above_limit
                 else "pass --confirm-above-limit if it is good"), file=sys.stderr)
    if over and not a.confirm_above_limit:
        print("edge-runtime adapt: nothing written", file=sys.stderr)
        return 2
    if a.dry_run:
        return 1 if plan.conflicts else 0
    out = Path(a.out)
    audit = {"learn_limit_overridden": {"limit": OPERATOR_LEARN_MAX, "images": over}} if over else None
    try:
        bundle = plan.write(out, who=a.who, signing_key=a.signing_key,
                            audit_log=a.audit_log or out.resolve().parent / AUDIT_FILE, audit_fields=audit)
    except (AdaptError, BundleError, OSError) as exc:
        print(f"edge-runtime adapt: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: bundle {bundle.bundle_id}, bundle_version {bundle.bundle_version} "
          f"(from {plan.parent.bundle_id}, version {plan.parent.bundle_version})")
    return 0

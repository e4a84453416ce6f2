"""`emotion-agent eval`: accuracy of the expression model on a FER2013-layout folder, or of the face
detector on dlib imglab XML boxes."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from agent.argtypes import check_output_file, plot_file, positive_int
from agent.config import load_config
from agent.errors import AgentError, SourceError


def _cmd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.plot and (args.faces or args.margins):  # before the run, not after it
        raise AgentError("--plot draws the emotion confusion matrix; it does not apply with --faces or --margins")
    if args.faces and args.margins is not None:
        raise AgentError("--margins measures the emotion crops; it does not apply with --faces")
    if args.plot:
        from agent.eval_emotion import require_pyplot

        require_pyplot()
        check_output_file(args.plot, "--plot")
    cfg = load_config(args.config)
    if not args.target.strip():
        raise SourceError("DIR: empty path")
    target = Path(args.target)
    if not target.exists():
        raise SourceError(f"not found: {target}")
    if args.faces:
        from agent.eval_faces import evaluate_detector, format_report
        from agent.pipeline import make_detector_from

        xmls = sorted(target.glob("*.xml")) if target.is_dir() else [target]
        if not xmls:
            raise SourceError(f"no imglab .xml files in {target}")
        result = evaluate_detector(xmls, make_detector_from(cfg))
    elif args.margins is not None:
        from agent.model_files import DEFAULT_EMOTION_MODEL, model_path
        from agent.eval_margin import evaluate_margins, format_report
        from agent.pipeline import make_detector_from

        margins = _floats(args.margins)
        classifier_model = model_path(cfg.classifier.model, DEFAULT_EMOTION_MODEL)
        result = evaluate_margins(target, make_detector_from(cfg), classifier_model, margins, limit=args.limit)
    else:
        from agent.eval_emotion import evaluate_folder, format_report
        from agent.pipeline import make_classifier_from

        if not target.is_dir():
            raise SourceError(f"expected a folder with one sub-folder per class: {target}")
        result = evaluate_folder(target, make_classifier_from(cfg), limit=args.limit)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_report(result))
    if args.plot:
        from agent.eval_emotion import plot_confusion

        plot_confusion(result, args.plot)
    return 0


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AgentError(f"--margins: expected numbers separated by commas, got {text!r}") from None
    if not values or any(not -0.3 <= v <= 1.0 for v in values):
        raise AgentError(f"--margins: expected values between -0.3 and 1.0, got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure accuracy: emotions on a FER2013 folder, or faces on dlib XML")
    p.add_argument("target", metavar="DIR",
                   help="FER2013 layout (one folder per class) or, with --faces, imglab XML file(s)/folder")
    p.add_argument("--faces", action="store_true", help="score the face detector against imglab boxes")
    p.add_argument("--margins", metavar="M,M,...",
                   help="detect each face, then classify crops at these margins (how the default was chosen); "
                        "write --margins=-0.1,0,0.1 when the first is negative")
    p.add_argument("--config", metavar="FILE", help="agent config whose models are measured")
    p.add_argument("--limit", type=positive_int, metavar="N", help="at most N images per class")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", metavar="FILE.png", type=plot_file,
                   help="draw the confusion matrix (needs matplotlib; .png, .pdf or .svg)")
    p.set_defaults(handler=_cmd)

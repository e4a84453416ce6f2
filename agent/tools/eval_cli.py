"""`emotion-agent eval`: accuracy of the expression model on a FER2013-layout folder, or of the face
detector on dlib imglab XML boxes."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from agent.argtypes import check_output_file
from agent.config import load_config
from agent.errors import AgentError, SourceError


def command(args: argparse.Namespace) -> int:
    """`emotion-agent eval`, with the arguments agent.cli declares for it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.plot and (args.faces or args.margins):  # before the run, not after it
        raise AgentError("--plot draws the emotion confusion matrix; it does not apply with --faces or --margins")
    if args.faces and args.margins is not None:
        raise AgentError("--margins measures the emotion crops; it does not apply with --faces")
    if args.plot:
        from agent.tools.eval_emotion import require_pyplot

        require_pyplot()
        check_output_file(args.plot, "--plot")
    cfg = load_config(args.config)
    if not args.target.strip():
        raise SourceError("DIR: empty path")
    target = Path(args.target)
    if not target.exists():
        raise SourceError(f"not found: {target}")
    if args.faces:
        from agent.tools.eval_faces import evaluate_detector, format_report
        from agent.detect import make_detector

        xmls = sorted(target.glob("*.xml")) if target.is_dir() else [target]
        if not xmls:
            raise SourceError(f"no imglab .xml files in {target}")
        result = evaluate_detector(xmls, make_detector(cfg.detector))
    elif args.margins is not None:
        from agent.model_files import DEFAULT_EMOTION_MODEL, model_path
        from agent.tools.eval_margin import evaluate_margins, format_report
        from agent.detect import make_detector

        margins = _floats(args.margins)
        classifier_model = model_path(cfg.classifier.model, DEFAULT_EMOTION_MODEL)
        result = evaluate_margins(target, make_detector(cfg.detector), classifier_model, margins, limit=args.limit)
    else:
        from agent.tools.eval_emotion import evaluate_folder, format_report
        from agent.classify import make_classifier

        if not target.is_dir():
            raise SourceError(f"expected a folder with one sub-folder per class: {target}")
        result = evaluate_folder(target, make_classifier(cfg.classifier), limit=args.limit)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_report(result))
    if args.plot:
        from agent.tools.eval_emotion import plot_confusion

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


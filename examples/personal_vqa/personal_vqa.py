"""Personal VQA: ask a question about every image in a folder with ONNX Runtime.

Give it an ONNX export (``fedvlm-edge export``) and one or two clients' ``.onnx_adapter``
files. With one adapter it prints that client's answer for each image; with two it prints
both side by side, so you see how two personalised models answer the same question
differently. With no adapter it answers as the shared base model.

    python personal_vqa.py --onnx export/ --adapter alice.onnx_adapter --adapter bob.onnx_adapter \\
        --images photos/ --question "what colour is the shape?"

    python personal_vqa.py --demo            # build everything locally and run on it

``--demo`` builds a tiny VLM, trains two clients a few steps on synthetic data whose answers
are in different languages (English and French), exports the model once, writes each
client's adapter and a folder of synthetic pictures, then runs the app on them. Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
DEMO_QUESTION = "what colour is the shape?"


class AppError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def find_images(folder: Path) -> list[Path]:
    if not folder.exists():
        raise AppError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise AppError(f"{str(folder)!r} is not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise AppError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}")
    return images


def check_inputs(onnx_dir: Path, adapters: list[Path]) -> None:
    if not onnx_dir.is_dir():
        raise AppError(f"ONNX export folder {str(onnx_dir)!r} does not exist (make one with `fedvlm-edge export`)")
    for adapter in adapters:
        if not adapter.is_file():
            raise AppError(f"adapter file {str(adapter)!r} does not exist")


def answer_folder(onnx_dir: Path, adapters: list[Path], images: list[Path], question: str,
                  max_new_tokens: int = 8) -> dict[str, list[str]]:
    """``{client: [answer per image]}``, one ONNX Runtime model, adapters swapped in turn."""
    from PIL import Image

    from fedvlm.edge.errors import EdgeError
    from fedvlm.edge.onnx_runner import OnnxVLM

    try:
        vlm = OnnxVLM.load(onnx_dir)
    except EdgeError as error:
        raise AppError(f"cannot load the ONNX export: {error}") from error
    pictures = []
    for path in images:
        with Image.open(path) as image:
            pictures.append(image.convert("RGB"))
    answers = {}
    for adapter in adapters or [None]:
        name = adapter.name.removesuffix(".onnx_adapter") if adapter else "base model"
        try:
            vlm.activate(adapter)  # checks the file against this export (fingerprint, shapes, checksum)
        except EdgeError as error:
            raise AppError(f"cannot use adapter {str(adapter)!r}: {error}") from error
        answers[name] = vlm.answers(pictures, [question] * len(pictures), max_new_tokens=max_new_tokens)
    return answers


def print_answers(question: str, images: list[Path], answers: dict[str, list[str]]) -> None:
    names = list(answers)
    width = max([len(p.name) for p in images] + [5])
    columns = [max([len(n)] + [len(a) for a in answers[n]]) for n in names]
    print(f"question: {question}")
    print(f"{'image':<{width}}  " + "  ".join(f"{n:<{w}}" for n, w in zip(names, columns)))
    print(f"{'-' * width}  " + "  ".join("-" * w for w in columns))
    for i, path in enumerate(images):
        print(f"{path.name:<{width}}  " + "  ".join(f"{answers[n][i] or '(empty)':<{w}}" for n, w in zip(names, columns)))
    if len(names) == 2:
        differ = sum(a != b for a, b in zip(answers[names[0]], answers[names[1]]))
        print(f"{names[0]} and {names[1]} answer differently on {differ} of {len(images)} images")


def make_demo_assets(out: Path, *, size: str = "small", steps: int = 30, n_images: int = 4) -> dict:
    """A tiny VLM, two clients (English, French) trained a few steps, the export, their adapters, images."""
    from fedvlm.edge.adapters import LoraSettings
    from fedvlm.edge.data import ScenarioConfig, all_words, generate_federation
    from fedvlm.edge.onnx_adapter import write_adapter
    from fedvlm.edge.onnx_export import export_onnx, read_manifest
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.edge.tiny_model import SIZES, make_tiny_model
    from fedvlm.edge.training import TrainingConfig

    out.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_model(out / "model", size, extra_words=all_words())
    model = PersonalVLM.from_pretrained(model_dir, lora=LoraSettings(), quantization="none", device="cpu")
    export_dir = export_onnx(model, out / "export")  # the base, once; adapters are swapped at run time
    manifest = read_manifest(export_dir)
    config = ScenarioConfig.preset("concept-shift", n_clients=2, examples_per_client=48,
                                   test_examples_per_client=n_images, common_test_examples=0,
                                   image_size=SIZES[size].image_size, question_kinds=("colour",), seed=0)
    federation = generate_federation(config)
    adapters = []
    for client, name in zip(federation.clients, ("alice", "bob")):
        model.reset_adapters()
        model.train(client.train, TrainingConfig(steps=steps, batch_size=8, learning_rate=1e-2, progress=False))
        adapters.append(write_adapter(out / f"{name}.onnx_adapter", model.adapter_state(), manifest))
        print(f"demo: trained {name} ({client.convention.language} answers) for {steps} steps")
    images = out / "images"
    images.mkdir(exist_ok=True)
    for i, record in enumerate(federation.clients[0].test):
        record.image.save(images / f"picture_{i}.png")
    return {"onnx": export_dir, "adapters": adapters, "images": images}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="ONNX export folder (from `fedvlm-edge export`)")
    parser.add_argument("--adapter", type=Path, action="append", default=[],
                        help="a client's .onnx_adapter file; give it twice to compare two clients")
    parser.add_argument("--images", type=Path, help="folder of images to ask about")
    parser.add_argument("--question", default=DEMO_QUESTION, help=f"default: {DEMO_QUESTION!r}")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="default: 8")
    parser.add_argument("--demo", action="store_true", help="build a model, two adapters and images locally, then run")
    parser.add_argument("--demo-dir", type=Path, help="where --demo builds its assets (default: a temp folder)")
    parser.add_argument("--demo-size", default="small", choices=["tiny", "small"], help="tiny VLM size for --demo")
    parser.add_argument("--demo-steps", type=int, default=30, help="training steps per client for --demo")
    parser.add_argument("--demo-images", type=int, default=4, help="pictures --demo makes")
    args = parser.parse_args(argv)
    if len(args.adapter) > 2:
        parser.error("give at most two --adapter files")

    try:
        if args.demo:
            started = time.perf_counter()
            out = args.demo_dir or Path(tempfile.mkdtemp(prefix="personal-vqa-demo-"))
            assets = make_demo_assets(out, size=args.demo_size, steps=args.demo_steps, n_images=args.demo_images)
            print(f"demo: assets in {out} ({time.perf_counter() - started:.1f} s)")
            args.onnx, args.adapter, args.images = assets["onnx"], assets["adapters"], assets["images"]
        elif args.onnx is None or args.images is None:
            parser.error("--onnx and --images are required (or run --demo)")
        check_inputs(args.onnx, args.adapter)
        images = find_images(args.images)
        answers = answer_folder(args.onnx, args.adapter, images, args.question, args.max_new_tokens)
    except AppError as error:
        print(f"personal_vqa: error: {error}", file=sys.stderr)
        return 2
    print_answers(args.question, images, answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

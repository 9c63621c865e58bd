"""A synthetic world for the benchmark: results and images as static files, plus the CSV export.

    DIR/www/<owner>/<app>/requests/<id>   a result (JSON), served as application/json
    DIR/www/files/<aa>/<name>.png         an image: PNG magic number, then random bytes
    DIR/www/files/<aa>/<name>.jpg         (``formats`` naming jpeg) a JPEG start and a frame
                                          header of 1024x768, then random bytes
    DIR/requests.csv                      model,request_id for every result
    DIR/urls.txt                          every result URL then every image URL (for curl)
    DIR/world.json                        what was generated, and for which port

Image URLs in the results are absolute, so they name the server's port; ``retarget`` rewrites
only the (small) result files when a later run has to use another port. Images are random, so
every one is distinct and the store keeps each of them; random bytes have the entropy of
compressed image data (nothing compresses them further). Each image is written once, from a
seeded generator, so a world of gigabytes builds at the disk's pace.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final

PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
JPEG_HEAD: Final = b"\xff\xd8" + b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 768, 1024, 1) + bytes(3)
"""A JPEG's start of image and a baseline frame header (1024x768 as the results declare, one
component): enough for the harvester to sniff a JPEG and read its size; the rest is random."""
HEADS: Final = {"png": (PNG_MAGIC, "png", "image/png"), "jpeg": (JPEG_HEAD, "jpg", "image/jpeg")}
"""A format's first bytes, the images' file extension and the results' ``content_type``."""
MODELS: Final = ("fal-ai/flux/dev", "fal-ai/flux-pro/v1.1-ultra", "fal-ai/fast-sdxl")
HOST: Final = "127.0.0.1"
IMAGE_COUNTS: Final = (1, 2, 3, 4)
IMAGE_COUNT_WEIGHTS: Final = (50, 30, 15, 5)
"""1-4 images per request, 1.75 on average (most generations ask for one image)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorldSpec:
    n: int
    image_bytes: int
    """Mean image size; each image is within +-20% of it."""
    port: int
    seed: int = 5
    formats: str = "png"
    """``png``, ``jpeg`` or both (``jpeg,png``): an image's format is picked from its name."""
    version: int = 2
    """Bumped when the layout or the distribution changes, so old worlds are rebuilt."""

    def head(self, name: str) -> tuple[bytes, str, str]:
        """The first bytes, extension and content type of the image called ``name``."""
        formats = self.formats.split(",")
        return HEADS[formats[int(name[:2], 16) % len(formats)]]


@dataclass(frozen=True, slots=True)
class World:
    root: Path
    spec: WorldSpec
    images: int
    image_bytes_total: int

    @property
    def www(self) -> Path:
        return self.root / "www"

    @property
    def csv(self) -> Path:
        return self.root / "requests.csv"

    @property
    def urls(self) -> Path:
        return self.root / "urls.txt"


def _app_path(model: str) -> str:
    return "/".join(model.split("/")[:2])


def _request_id(rng: random.Random) -> str:
    h = rng.randbytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _plan(spec: WorldSpec) -> list[tuple[str, str, list[tuple[str, int]]]]:
    """``(model, request_id, [(image name, size), ...])`` for every request, deterministic."""
    rng = random.Random(spec.seed)
    low, high = int(spec.image_bytes * 0.8), int(spec.image_bytes * 1.2)
    plan = []
    for _ in range(spec.n):
        model = rng.choice(MODELS)
        rid = _request_id(rng)
        count = rng.choices(IMAGE_COUNTS, IMAGE_COUNT_WEIGHTS)[0]
        images = [(rng.randbytes(12).hex(), rng.randint(low, high)) for _ in range(count)]
        plan.append((model, rid, images))
    return plan


def _image_url(base: str, spec: WorldSpec, name: str) -> str:
    return f"{base}/files/{name[:2]}/{name}.{spec.head(name)[1]}"


def _result(
    rid: str, images: list[tuple[str, int]], base: str, rng: random.Random, spec: WorldSpec
) -> bytes:
    body = {
        "images": [
            {
                "url": _image_url(base, spec, name),
                "content_type": spec.head(name)[2],
                "width": 1024,
                "height": 768,
            }
            for name, _ in images
        ],
        "seed": rng.getrandbits(63),
        "has_nsfw_concepts": [False] * len(images),
        "prompt": f"a synthetic benchmark image for request {rid}",
        "timings": {"inference": round(rng.uniform(0.5, 3.0), 6)},
        "request": {"id": rid},
    }
    return json.dumps(body).encode()


def _write_results(root: Path, spec: WorldSpec) -> None:
    base = f"http://{HOST}:{spec.port}"
    rng = random.Random(spec.seed + 1)
    created: set[Path] = set()
    with open(root / "urls.txt.tmp", "w") as urls:
        image_urls: list[str] = []
        for model, rid, images in _plan(spec):
            folder = root / "www" / _app_path(model) / "requests"
            if folder not in created:
                folder.mkdir(parents=True, exist_ok=True)
                created.add(folder)
            (folder / rid).write_bytes(_result(rid, images, base, rng, spec))
            urls.write(f"{base}/{_app_path(model)}/requests/{rid}\n")
            image_urls.extend(f"{_image_url(base, spec, name)}\n" for name, _ in images)
        urls.writelines(image_urls)
    (root / "urls.txt.tmp").replace(root / "urls.txt")


def generate(root: Path, spec: WorldSpec) -> World:
    """Build the world in ``root`` (reused as is if it was built from the same spec)."""
    meta = root / "world.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        if WorldSpec(**saved["spec"]) == spec:
            return World(root, spec, saved["images"], saved["image_bytes_total"])
        if replace(WorldSpec(**saved["spec"]), port=spec.port) == spec:
            return retarget(root, spec.port)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed + 2)
    count = total = 0
    made: set[str] = set()
    with open(root / "requests.csv", "w") as csv:
        csv.write("model,request_id\n")
        for model, rid, images in _plan(spec):
            csv.write(f"{model},{rid}\n")
            for name, size in images:
                if name[:2] not in made:
                    (root / "www" / "files" / name[:2]).mkdir(parents=True, exist_ok=True)
                    made.add(name[:2])
                head, ext, _ = spec.head(name)
                data = head + rng.randbytes(size - len(head))
                (root / "www" / "files" / name[:2] / f"{name}.{ext}").write_bytes(data)
                count += 1
                total += size
    _write_results(root, spec)
    meta.write_text(
        json.dumps({"spec": asdict(spec), "images": count, "image_bytes_total": total}) + "\n"
    )
    return World(root, spec, count, total)


def retarget(root: Path, port: int) -> World:
    """Point the results at another port (rewrites results and urls.txt, not images)."""
    meta = root / "world.json"
    saved = json.loads(meta.read_text())
    spec = WorldSpec(**{**saved["spec"], "port": port})
    _write_results(root, spec)
    saved["spec"] = asdict(spec)
    meta.write_text(json.dumps(saved) + "\n")
    return World(root, spec, saved["images"], saved["image_bytes_total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--image-bytes", type=int, default=30_000)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--formats", default="png", help="png, jpeg or jpeg,png")
    args = parser.parse_args()
    spec = WorldSpec(n=args.n, image_bytes=args.image_bytes, port=args.port, formats=args.formats)
    world = generate(args.root, spec)
    print(
        f"{world.root}: {world.spec.n:,} requests, {world.images:,} images, "
        f"{world.image_bytes_total / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    main()

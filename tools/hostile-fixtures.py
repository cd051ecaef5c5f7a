"""Writes the small seed corpora under fuzz/corpus and the images of the hostile corpus
that the Rust image crate cannot write (a CMYK JPEG, an animated WebP) under
tests/fixtures/hostile. Needs Pillow; run from the repo root:

python3 tools/hostile-fixtures.py
"""
import io
import struct
import zipfile
from pathlib import Path

from PIL import Image

root = Path("fuzz/corpus")


def image_bytes(fmt, mode="RGB", size=(8, 8), **kw):
    out = io.BytesIO()
    Image.new(mode, size, (200, 120, 40) if mode == "RGB" else 128).save(out, fmt, **kw)
    return out.getvalue()


def jpeg_with_orientation(orientation):
    # A minimal little-endian TIFF header with one IFD entry: Orientation (0x0112), SHORT.
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    exif = b"Exif\x00\x00" + tiff
    jpeg = image_bytes("JPEG", size=(8, 4))
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    return jpeg[:2] + app1 + jpeg[2:]


photos = {
    "rgb.png": image_bytes("PNG"),
    "grey16.png": image_bytes("PNG", mode="I;16"),
    "rgba.png": image_bytes("PNG", mode="RGBA"),
    "rgb.jpg": image_bytes("JPEG"),
    "cmyk.jpg": image_bytes("JPEG", mode="CMYK"),
    "orientation6.jpg": jpeg_with_orientation(6),
    "rgb.webp": image_bytes("WEBP", lossless=True),
    "lossy.webp": image_bytes("WEBP", quality=50),
}
for name, data in photos.items():
    (root / "decode_photo" / name).write_bytes(data)


def zip_bytes(entries, **kw):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", **kw) as z:
        for name, data in entries:
            z.writestr(name, data)
    return out.getvalue()


archives = {
    "pack.zip": zip_bytes([("faces/a.png", photos["rgb.png"]), ("faces/b.jpg", photos["rgb.jpg"])]),
    "deflated.zip": zip_bytes(
        [("a.webp", photos["rgb.webp"]), ("notes.txt", b"hi")], compression=zipfile.ZIP_DEFLATED
    ),
    "folders.zip": zip_bytes([("faces/", b""), ("__MACOSX/._a.png", b"x"), (".hidden.png", b"x")]),
    "slip.zip": zip_bytes([("../evil.png", photos["rgb.png"])]),
}
for name, data in archives.items():
    (root / "archive" / name).write_bytes(data)

(root / "config" / "config.toml").write_bytes(Path("config.toml").read_bytes())
(root / "config" / "small.toml").write_bytes(
    b'[limits]\nmax_bytes = 10\nmax_pixels = 10\n[models]\ndir = "m"\n[faces]\nmax_faces = 1\n'
    b'min_score = 0.5\nmin_face_px = 1\n[styles]\ndir = "s"\ndefault = "p2c"\n'
)
(root / "attachment" / "discord-cdn").write_bytes(
    b"https://cdn.discordapp.com/attachments/1/2/me.jpg\x00me.jpg\x00image/jpeg"
)

fixtures = Path("tests/fixtures/hostile")
fixtures.mkdir(parents=True, exist_ok=True)
Image.new("CMYK", (64, 64), (10, 50, 90, 0)).save(fixtures / "cmyk.jpg", quality=90)
(root / "decode_photo" / "cmyk64.jpg").write_bytes((fixtures / "cmyk.jpg").read_bytes())
frames = [Image.new("RGB", (64, 64), (80 * i, 100, 200)) for i in range(3)]
frames[0].save(fixtures / "animated.webp", save_all=True, append_images=frames[1:], duration=100, loop=0)
(root / "decode_photo" / "animated.webp").write_bytes((fixtures / "animated.webp").read_bytes())
# 10000 x 5000 pixels of one colour: a 38-byte decompression bomb past the 40 Mpx limit.
Image.new("RGB", (10000, 5000), (200, 120, 40)).save(fixtures / "50mpx.webp", lossless=True, method=0)

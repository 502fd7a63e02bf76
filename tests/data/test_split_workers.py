"""``split_images(workers=2)``: worker processes write what one process writes (own file: starting the
processes imports monatune once more, which takes most of this test's time)."""
from test_split import square, write_source

from monatune.data.split import split_images


def test_workers_write_what_one_process_writes(tmp_path):
    sources = [write_source(tmp_path / f"s{k}", size=(700 + 200 * k, 600), name=f"P{k}",
                            lines=[square(50 + k, 60, 30), square(690, 100, 40, "ship", 1)]) for k in range(4)]  # fmt: skip
    one = split_images(sources, tmp_path / "one", sizes=(512,), gaps=(112,), progress=False)
    two = split_images(sources, tmp_path / "two", sizes=(512,), gaps=(112,), workers=2, progress=False)
    # 512 windows every 400: x starts 0, 188 | 0, 388 | 0, 400, 588 | 0, 400, 788; y starts 0, 88
    assert one == two and one.patches == 2 * (2 + 2 + 3 + 3)
    for sub in ("images", "annfiles"):
        a = {p.name: p.read_bytes() for p in (tmp_path / "one" / sub).iterdir()}
        b = {p.name: p.read_bytes() for p in (tmp_path / "two" / sub).iterdir()}
        assert a == b and len(a) == one.patches
    assert (tmp_path / "one" / ".split_done").read_text() == (tmp_path / "two" / ".split_done").read_text()

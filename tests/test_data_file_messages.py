"""A GLUE TSV or a clip CSV with a non-UTF-8 byte, a clip CSV row without a caption: exit 2 and
one line naming the file and the line, through the real CLI, before any model is loaded."""

from __future__ import annotations

import pytest

from masksub.cli import main

LATIN1 = "caf\xe9".encode("latin-1")  # a spreadsheet's cp1252 / Latin-1 save


def glue_files(d, bad):
    header = b"sentence\tlabel\n"
    rows = b"a fine film\t1\na dull film\t0\n"
    (d / "train.tsv").write_bytes(header + rows + (LATIN1 + b" au lait\t1\n" if bad else b""))
    (d / "dev.tsv").write_bytes(header + rows)


def clip_csv(d, body: bytes):
    pytest.importorskip("PIL.Image")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(d / "a.png")
    (d / "pairs.csv").write_bytes(b"filepath,title\n" + body)
    return str(d / "pairs.csv")


CASES = {
    "glue_latin1": ("glue", lambda d: (glue_files(d, True), ["--task", "sst2", "--model", "nope", "--data-dir", str(d)])[1],
                    "train.tsv, line 4: byte 0xe9"),
    "clip_latin1": ("clip", lambda d: ["--data", clip_csv(d, b"a.png,a red square\na.png," + LATIN1 + b"\n"), "--model", "RN50"],
                    "pairs.csv, line 3: byte 0xe9"),
    "clip_no_caption": ("clip", lambda d: ["--data", clip_csv(d, b"a.png,a red square\na.png\n"), "--model", "RN50"],
                        "pairs.csv, line 3: no caption"),
    "clip_empty_caption": ("clip", lambda d: ["--data", clip_csv(d, b"a.png,\na.png,a red square\n"), "--model", "RN50"],
                           "pairs.csv, line 2: no caption"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_file_gets_exit_2_naming_file_and_line(case, tmp_path, capsys):
    cmd, make, want = CASES[case]
    if cmd == "clip":
        pytest.importorskip("open_clip")
    args = make(tmp_path)
    out = tmp_path / "out"
    rc = main([cmd, *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert want in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()

"""Labels CSVs: rows, headers, extra columns, the split column and the errors naming lines."""


import pytest

from shards.blocks import LabelError
from shards.labels_csv import LabelsCsv, csv_labeler, csv_splitter


def _csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_labeler_relative_paths_header_and_missing_file(tmp_path):
    root = tmp_path / "imgs"
    csv_path = _csv(tmp_path / "labels.csv", "path,label\na/1.jpg,cat\n./b/2.jpg,dog\n\n")
    label = csv_labeler(csv_path, root)
    assert label(root / "a" / "1.jpg") == "cat"
    assert label(root / "b" / "2.jpg") == "dog"
    with pytest.raises(LabelError, match=r"3\.jpg.*labels\.csv"):
        label(root / "a" / "3.jpg")


def test_csv_labeler_without_header_and_with_bom(tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_bytes("\ufeffx.png,zèbre\n".encode())
    assert csv_labeler(csv_path, tmp_path)(tmp_path / "x.png") == "zèbre"


def test_csv_labeler_bad_rows_name_the_line(tmp_path):
    with pytest.raises(LabelError, match=r"bad\.csv:2"):
        csv_labeler(_csv(tmp_path / "bad.csv", "a.jpg,cat\nb.jpg\n"), tmp_path)
    with pytest.raises(LabelError, match=r"dup\.csv:2.*'cat'.*'dog'"):
        csv_labeler(_csv(tmp_path / "dup.csv", "a.jpg,cat\na.jpg,dog\n"), tmp_path)


def test_header_finds_columns_by_name_in_any_order_and_case(tmp_path):
    csv_path = _csv(tmp_path / "l.csv", "Label,Is_Valid,Path\ncat,False,a.jpg\ndog,True,b/c.jpg\n")
    labels = LabelsCsv(csv_path, tmp_path)
    assert labels.header == ["label", "is_valid", "path"]
    assert labels(tmp_path / "a.jpg") == "cat" and labels(tmp_path / "b/c.jpg") == "dog"
    assert labels.column("IS_VALID") == {"a.jpg": "False", "b/c.jpg": "True"}
    assert len(labels) == 2


def test_a_row_with_the_wrong_number_of_cells_names_the_line_and_the_header(tmp_path):
    csv_path = _csv(tmp_path / "l.csv", "path,label,split\na.jpg,cat,train\nb.jpg,dog\n")
    with pytest.raises(LabelError, match=r"l\.csv:3: expected 'path,label,split'"):
        LabelsCsv(csv_path, tmp_path)


def test_a_path_leaving_the_folder_is_refused(tmp_path):
    for bad in ("../x.jpg", "/etc/x.jpg", "a/../../x.jpg"):
        csv_path = _csv(tmp_path / "l.csv", f"ok.jpg,cat\n{bad},dog\n")
        with pytest.raises(LabelError, match=r"l\.csv:2: .* not a path inside the image folder"):
            LabelsCsv(csv_path, tmp_path)


def test_the_same_row_twice_is_fine_but_other_values_are_not(tmp_path):
    csv_path = _csv(tmp_path / "l.csv", "path,label,split\na.jpg,cat,train\n./a.jpg,cat,train\n")
    assert len(LabelsCsv(csv_path, tmp_path)) == 1
    csv_path = _csv(tmp_path / "l.csv", "path,label,split\na.jpg,cat,train\na.jpg,cat,valid\n")
    with pytest.raises(LabelError, match=r"l\.csv:3: 'a\.jpg' listed with other values on line 2"):
        LabelsCsv(csv_path, tmp_path)


def test_check_files_names_the_row_of_a_missing_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    csv_path = _csv(tmp_path / "l.csv", "a.jpg,cat\n\nsub/gone.jpg,dog\nalso_gone.jpg,dog\n")
    labels = LabelsCsv(csv_path, tmp_path)
    with pytest.raises(LabelError, match=r"l\.csv:3: 'sub/gone\.jpg' does not exist under .*"
                                         r"\(and 1 more rows\)"):
        labels.check_files()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/gone.jpg").write_bytes(b"x")
    (tmp_path / "also_gone.jpg").write_bytes(b"x")
    labels.check_files()  # all there now


def test_an_unreadable_csv_is_a_label_error(tmp_path):
    with pytest.raises(LabelError, match=r"nope\.csv: cannot read labels CSV"):
        LabelsCsv(tmp_path / "nope.csv", tmp_path)


def test_csv_splitter_words_and_fastai_booleans(tmp_path):
    rows = "a,train\nb,valid\nc,VAL\nd,true\ne,False\nf,1\ng,0\nh, Validation \n"
    text = "path,label,split\n" + "".join(f"{n}.jpg,x,{v}\n" for n, v in
                                         (r.split(",") for r in rows.splitlines()))
    split = csv_splitter(LabelsCsv(_csv(tmp_path / "l.csv", text), tmp_path), "split")
    got = {n: split(tmp_path / f"{n}.jpg") for n in "abcdefgh"}
    assert got == {"a": "train", "b": "valid", "c": "valid", "d": "valid", "e": "train",
                   "f": "valid", "g": "train", "h": "valid"}
    assert split(tmp_path / "unlisted.jpg") is None


def test_csv_splitter_errors_name_the_column_or_the_line(tmp_path):
    labels = LabelsCsv(_csv(tmp_path / "l.csv", "path,label,split\na.jpg,x,train\n"
                                                 "b.jpg,x,test\n"), tmp_path)
    with pytest.raises(LabelError, match=r"l\.csv:3: column 'split' is 'test'; expected train"):
        csv_splitter(labels, "split")
    with pytest.raises(LabelError, match=r"no column 'fold'; the columns are path,label,split"):
        csv_splitter(labels, "fold")
    no_header = LabelsCsv(_csv(tmp_path / "n.csv", "a.jpg,x\n"), tmp_path)
    with pytest.raises(LabelError, match=r"no header row.*'path,label,split'"):
        csv_splitter(no_header, "split")

"""pipeline.data.annotations: Kinetics CSV, Something-Something v2 JSON, plain lists; labels; splits."""

import json

import pytest

from pipeline.data.annotations import (AnnotationError, labels_json, load_annotations, parse_annotations, parse_labels,
                                       resolve_labels, split_from_name)

KINETICS = """label,youtube_id,time_start,time_end,split
abseiling,--0edUL8zmA,0,10,train
zumba,-0NP8Ez6fS0,14,24,train
air drumming,0Ab_Iz3y1N4,30.0,40.0,train
abseiling,badtimes,x,10,train
abseiling,,0,10,train
zumba,backwards,20,10,train
,nolabel,0,10,train
abseiling,toomany,0,10,train,extra
"""


def by_path(ann):
    return {r.path: r for r in ann.rows}


def test_kinetics_rows_paths_labels_and_bad_rows(tmp_path):
    (tmp_path / "k400_train.csv").write_text(KINETICS)
    ann = load_annotations(str(tmp_path / "k400_train.csv"))
    assert ann.labels == ["abseiling", "air drumming", "zumba"]  # sorted names
    assert len(ann.rows) == 8  # nothing dropped
    good = [r for r in ann.rows if not r.error]
    assert [(r.path, r.label_name, r.label, r.split) for r in good] == [
        ("--0edUL8zmA_000000_000010.mp4", "abseiling", 0, "train"),
        ("-0NP8Ez6fS0_000014_000024.mp4", "zumba", 2, "train"),
        ("0Ab_Iz3y1N4_000030_000040.mp4", "air drumming", 1, "train")]
    errors = [(r.where.rsplit(":", 1)[1], r.error) for r in ann.rows if r.error]
    assert errors == [("5", "time_start/time_end 'x'/'10' are not whole seconds"),
                      ("6", "empty youtube_id"),
                      ("7", "time_end 10 is not after time_start 20"),
                      ("8", "missing label"),
                      ("9", "6 fields, the header has 5")]


def test_kinetics_layouts_and_split_from_file_name(tmp_path):
    text = "label,youtube_id,time_start,time_end\nzumba,abc,1,11\n"
    (tmp_path / "validate.csv").write_text(text)
    uri = str(tmp_path / "validate.csv")
    assert load_annotations(uri).rows[0].split == "val"  # validate -> val, from the file name
    assert load_annotations(uri, layout="split").rows[0].path == "val/abc_000001_000011.mp4"
    assert load_annotations(uri, layout="label").rows[0].path == "zumba/abc_000001_000011.mp4"
    assert load_annotations(uri, split="test").rows[0].split == "test"  # the caller's split wins over the name
    with pytest.raises(AnnotationError, match=r"validate.csv: a Kinetics CSV needs the header columns "
                                              r"youtube_id,time_start,time_end"):
        parse_annotations("a,b\n1,2\n", format="kinetics", source=str(tmp_path / "validate.csv"))


def test_kinetics_test_split_may_be_unlabelled():
    rows = parse_annotations("youtube_id,time_start,time_end,split\nabc,0,10,test\n", format="kinetics",
                             source="test.csv")
    ann = resolve_labels(rows)
    assert ann.rows[0].error == "" and ann.rows[0].label == -1 and ann.rows[0].split == "test"


SSV2_LABELS = {"Holding something next to something": "1", "Approaching something with your camera": "0",
               "Pushing something from left to right": "2"}
SSV2 = [
    {"id": "78687", "label": "holding potato next to vicks", "template": "Holding [something] next to [something]",
     "placeholders": ["potato", "vicks"]},
    {"id": 42326, "template": "Pushing [something] from left to right"},
    {"id": "1", "template": "Teleporting [something]"},
    {"template": "Pushing [something] from left to right"},
    "not an object",
]


def test_ssv2_with_official_labels(tmp_path):
    (tmp_path / "something-something-v2-validation.json").write_text(json.dumps(SSV2))
    (tmp_path / "something-something-v2-labels.json").write_text(json.dumps(SSV2_LABELS))
    ann = load_annotations(str(tmp_path / "something-something-v2-validation.json"),
                           labels_uri=str(tmp_path / "something-something-v2-labels.json"))
    assert ann.labels == ["Approaching something with your camera", "Holding something next to something",
                          "Pushing something from left to right"]
    rows = ann.rows
    assert len(rows) == 5
    assert (rows[0].path, rows[0].label, rows[0].label_name, rows[0].split) == (
        "78687.webm", 1, "Holding something next to something", "val")
    assert (rows[1].path, rows[1].label) == ("42326.webm", 2)
    assert rows[2].error == "label 'Teleporting something' is not in the labels file (3 labels)"
    assert rows[3].error == "bad id None"
    assert rows[4].error == "entry is a str, not an object"


def test_ssv2_without_labels_file_uses_sorted_names():
    rows = parse_annotations(json.dumps(SSV2[:2]), format="ssv2", source="train.json")
    ann = resolve_labels(rows)
    assert ann.labels == ["Holding something next to something", "Pushing something from left to right"]
    assert [r.label for r in ann.rows] == [0, 1] and {r.split for r in ann.rows} == {"train"}
    with pytest.raises(AnnotationError, match="x.json: Something-Something annotations are a JSON list"):
        parse_annotations("{}", format="ssv2", source="x.json")


def test_list_names_indices_splits_and_bad_rows(tmp_path):
    text = "\n".join([
        "# comment", "",
        "a/one.mp4 walking",
        "a/two.mp4 running val",
        "b/with space.mp4\tjumping",
        "b/three.mp4",
        "b/four.mp4 running test extra",
        "b/five.mp4 -3",
    ])
    (tmp_path / "list.txt").write_text(text)
    ann = load_annotations(str(tmp_path / "list.txt"), split="train")
    rows = by_path(ann)
    assert ann.labels == ["jumping", "running", "walking"]
    assert (rows["a/one.mp4"].label, rows["a/one.mp4"].split) == (2, "train")
    assert (rows["a/two.mp4"].label, rows["a/two.mp4"].split) == (1, "val")  # the row's own split wins
    assert rows["b/with space.mp4"].label_name == "jumping"
    assert rows["b/three.mp4"].error == "expected 'path label [split]', got 1 field(s)"
    assert rows["b/four.mp4"].error == "expected 'path label [split]', got 4 field(s)"
    assert rows["b/five.mp4"].error == "negative label index -3"
    assert rows["b/three.mp4"].where == f"{tmp_path / 'list.txt'}:6"


def test_list_integer_labels_with_and_without_labels_file(tmp_path):
    (tmp_path / "val.txt").write_text("x.mp4 0\ny.mp4 2\nz.mp4 7\n")
    ann = load_annotations(str(tmp_path / "val.txt"))
    assert ann.labels == ["0", "1", "2", "3", "4", "5", "6", "7"]
    assert [(r.label, r.label_name, r.split) for r in ann.rows] == [(0, "0", "val"), (2, "2", "val"),
                                                                   (7, "7", "val")]
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    ann = load_annotations(str(tmp_path / "val.txt"), labels_uri=str(tmp_path / "labels.txt"))
    assert [(r.label, r.label_name, r.error) for r in ann.rows] == [
        (0, "cat", ""), (2, "bird", ""), (-1, "", "label index 7 is out of range for 3 labels")]


def test_list_mixed_indices_and_names_without_labels_file():
    ann = resolve_labels(parse_annotations("x.mp4 cat\ny.mp4 1\n", format="list", source="l.txt"))
    assert ann.rows[0].error == "" and ann.rows[0].label == 0
    assert ann.rows[1].error.startswith("label index 1 given while other rows use names")


def test_labels_file_fixes_indices_across_files(tmp_path):
    (tmp_path / "train.txt").write_text("a.mp4 zebra\nb.mp4 ant\n")
    (tmp_path / "val.txt").write_text("c.mp4 moose\n")
    ann = load_annotations([str(tmp_path / "train.txt"), str(tmp_path / "val.txt")])
    assert ann.labels == ["ant", "moose", "zebra"]  # one shared, sorted set
    assert [(r.label, r.split) for r in ann.rows] == [(2, "train"), (0, "train"), (1, "val")]
    (tmp_path / "labels.json").write_text(labels_json(["zebra", "moose", "ant"]))
    ann = load_annotations([str(tmp_path / "train.txt"), str(tmp_path / "val.txt")],
                           labels_uri=str(tmp_path / "labels.json"))
    assert ann.labels == ["zebra", "moose", "ant"] and [r.label for r in ann.rows] == [0, 2, 1]


def test_parse_labels_forms_and_errors():
    assert parse_labels('["b", "a"]') == ["b", "a"]
    assert parse_labels('{"b": 1, "a": "0"}') == ["a", "b"]
    assert parse_labels("x\n y \n\n") == ["x", "y"]
    with pytest.raises(AnnotationError, match="labels.json: label 'x' appears twice"):
        parse_labels('["x", "x"]', source="labels.json")
    with pytest.raises(AnnotationError, match=r"l: indices must be 0..1, each once; 'b' has 5"):
        parse_labels('{"a": 0, "b": 5}', source="l")
    with pytest.raises(AnnotationError, match="l: no labels"):
        parse_labels("\n", source="l")


@pytest.mark.parametrize("name,split", [("train.csv", "train"), ("kinetics400_val.csv", "val"),
                                        ("something-something-v2-validation.json", "val"),
                                        ("testlist01.txt", "test"), ("videos.txt", None)])
def test_split_from_name(name, split):
    assert split_from_name(f"s3://bucket/ann/{name}") == split


def test_unknown_format():
    with pytest.raises(AnnotationError, match="format 'xml' is not one of auto, kinetics, ssv1, ssv2, list"):
        parse_annotations("", format="xml", source="a.xml")


def test_ssv1_csv_rows_and_the_official_list(tmp_path):
    from pipeline.data.official import class_list

    names = class_list("ssv1")
    (tmp_path / "something-something-v1-validation.csv").write_text(
        f"100218;{names[5]}\n\n48032;{names[0]}\n;{names[1]}\n9;a;b\n77;\n")
    (tmp_path / "something-something-v1-test.csv").write_text("1420\n")
    ann = load_annotations([str(tmp_path / "something-something-v1-validation.csv"),
                            str(tmp_path / "something-something-v1-test.csv")], labels_uri="ssv1")
    assert ann.labels == names  # `--labels ssv1`: the official checkpoints' 174 classes and indices
    rows = [(r.path, r.label, r.split, r.error) for r in ann.rows]
    assert rows[:2] == [("100218", 5, "val", ""), ("48032", 0, "val", "")]
    assert rows[2][3] == "bad id '' (expected 'id;label name')"
    assert rows[3][3] == "3 fields separated by ';', expected 'id;label name'"
    assert rows[4][3] == "missing label"
    assert rows[5] == ("1420", -1, "test", "")  # the test file names no labels
    assert ann.rows[0].where.endswith("something-something-v1-validation.csv:1")
    # A Kinetics CSV keeps its format under the same suffix.
    (tmp_path / "train.csv").write_text(KINETICS)
    assert parse_annotations(KINETICS, format="auto", source="train.csv")[0].path == "--0edUL8zmA_000000_000010.mp4"
    assert load_annotations(str(tmp_path / "train.csv"), labels_uri="k400").labels == class_list("k400")

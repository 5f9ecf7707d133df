"""Annotation readers: each format read from small files written here, and their errors."""

import fnmatch
import tomllib
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffast.eval.annotations import (
    VOC_CLASSES, AnnotatedObject, AnnotationError, load_annotations, read_synsets,
)  # fmt: skip

SYNSETS = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "n01751748 sea snake"]
ASSET = "ILSVRC2012_val_00000001.xml"


def voc_xml(filename, objects, size=(500, 375), folder="val"):
    """A Pascal VOC layout annotation, as ImageNet's and VOC's files are written."""
    parts = [f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{filename}</filename>\n",
             f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n",
             "\t\t<depth>3</depth>\n\t</size>\n"]
    for name, (x0, y0, x1, y1) in objects:
        parts.append(f"\t<object>\n\t\t<name>{name}</name>\n\t\t<bndbox>\n"
                     f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
                     f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    return "".join(parts) + "</annotation>\n"


def write_synsets(folder):
    path = folder / "LOC_synset_mapping.txt"
    path.write_text("\n".join(SYNSETS) + "\n")
    return path


def boxes_of(annotation):
    return [(obj.class_index, obj.box) for obj in annotation.objects]


def test_imagenet_xml_folder_with_the_synset_list_above_it(tmp_path):
    write_synsets(tmp_path)
    val = tmp_path / "Annotations" / "CLS-LOC" / "val"
    val.mkdir(parents=True)
    (val / "ILSVRC2012_val_00000007.xml").write_text(
        voc_xml("ILSVRC2012_val_00000007", [("n01443537", (10, 20, 110, 220)), ("n01440764", (0, 5, 40, 60))])
    )
    (val / "ILSVRC2012_val_00000008.xml").write_text(voc_xml("ILSVRC2012_val_00000008", [("n01751748", (1, 2, 3, 4))]))
    annotations = load_annotations(val)
    assert annotations.format == "imagenet-xml" and annotations.key == "stem" and len(annotations) == 2
    first = annotations.for_image("n01443537/ILSVRC2012_val_00000007.JPEG")
    assert boxes_of(first) == [(1, (10.0, 20.0, 110.0, 220.0)), (0, (0.0, 5.0, 40.0, 60.0))]
    assert first.size == (500, 375) and first.classes == {0, 1} and first.boxes(1) == [(10.0, 20.0, 110.0, 220.0)]
    assert boxes_of(annotations.for_image("ILSVRC2012_val_00000008.png")) == [(2, (1.0, 2.0, 3.0, 4.0))]
    assert annotations.for_image("ILSVRC2012_val_00000009.JPEG") is None


def test_the_shipped_validation_file_reads_as_etree_reads_it(tmp_path):
    asset = resources.files("caffast.eval") / "assets" / "imagenet" / ASSET
    with resources.as_file(asset) as path:
        annotations = load_annotations(path.parent, synsets=write_synsets(tmp_path))
        root = ET.parse(path).getroot()
    expected = [
        (SYNSETS.index(next(s for s in SYNSETS if s.startswith(obj.findtext("name")))),
         tuple(float(obj.find("bndbox").findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")))
        for obj in root.iter("object")
    ]  # fmt: skip
    annotation = annotations.for_image("ILSVRC2012_val_00000001.JPEG")
    assert root.findtext("folder") == "val" and root.findtext("filename") == "ILSVRC2012_val_00000001"
    assert expected and boxes_of(annotation) == expected
    assert annotation.size == (int(root.findtext("size/width")), int(root.findtext("size/height")))


def test_package_data_ships_the_validation_file():
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["caffast.eval"]
    assert any(fnmatch.fnmatch(f"assets/imagenet/{ASSET}", pattern) for pattern in patterns)


def test_loc_val_solution_csv(tmp_path):
    write_synsets(tmp_path)
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\n"
                    "ILSVRC2012_val_00008726,n01751748 255 142 454 329 n01751748 44 21 322 295 \n"
                    "ILSVRC2012_val_00000003,n01440764 0 0 10 20\n")  # fmt: skip
    annotations = load_annotations(path)
    assert annotations.format == "imagenet-csv" and len(annotations) == 2
    assert boxes_of(annotations.for_image("ILSVRC2012_val_00008726.JPEG")) == [
        (2, (255.0, 142.0, 454.0, 329.0)), (2, (44.0, 21.0, 322.0, 295.0))]
    assert boxes_of(annotations.for_image("a/ILSVRC2012_val_00000003.jpg")) == [(0, (0.0, 0.0, 10.0, 20.0))]


def write_cub(folder, rows):
    """rows: (id, relative path, (x, y, w, h), 1-based class)."""
    (folder / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (folder / "bounding_boxes.txt").write_text("".join(f"{i} {' '.join(map(str, b))}\n" for i, _, b, _ in rows))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, _, c in rows))


def test_cub_boxes_are_corners_and_classes_zero_based(tmp_path):
    rows = [(1, "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg", (60.0, 27.0, 325.0, 304.0), 1),
            (2, "200.Common_Yellowthroat/Common_Yellowthroat_0003_190521.jpg", (12.5, 8.0, 100.0, 50.0), 200)]
    write_cub(tmp_path, rows)
    annotations = load_annotations(tmp_path)
    assert annotations.format == "cub" and annotations.key == "path"
    for _, relative, (x, y, w, h), label in rows:
        assert boxes_of(annotations.for_image(relative)) == [(label - 1, (x, y, x + w, y + h))]
    assert annotations.for_image("Black_Footed_Albatross_0001_796111.jpg") is None  # the path is the key, not the stem


def test_voc_root_with_masks_and_a_given_class_list(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "Annotations" / "2007_000032.xml").write_text(
        voc_xml("2007_000032.jpg", [("aeroplane", (104, 78, 375, 183)), ("person", (195, 180, 213, 229))]))
    (tmp_path / "Annotations" / "2007_000033.xml").write_text(voc_xml("2007_000033.jpg", [("dog", (1, 1, 9, 9))]))
    labels = np.zeros((375, 500), dtype=np.uint8)
    Image.fromarray(labels, mode="L").save(tmp_path / "SegmentationClass" / "2007_000032.png")
    annotations = load_annotations(tmp_path)
    assert annotations.format == "voc"
    first = annotations.for_image("JPEGImages/2007_000032.jpg")
    assert boxes_of(first) == [(VOC_CLASSES.index("aeroplane"), (104.0, 78.0, 375.0, 183.0)),
                               (VOC_CLASSES.index("person"), (195.0, 180.0, 213.0, 229.0))]
    assert first.mask == str(tmp_path / "SegmentationClass" / "2007_000032.png")
    assert first.mask_value(VOC_CLASSES.index("person")) == VOC_CLASSES.index("person") + 1
    assert annotations.for_image("2007_000033.jpg").mask is None
    mine = load_annotations(tmp_path, class_names=["person", "dog", "aeroplane"])
    assert [obj.class_index for obj in mine.for_image("2007_000032.jpg").objects] == [2, 0]
    assert mine.for_image("2007_000032.jpg").mask_value(0) == VOC_CLASSES.index("person") + 1


def test_a_folder_of_voc_xml_files_is_voc_not_imagenet(tmp_path):
    (tmp_path / "a.xml").write_text(voc_xml("a.jpg", [("cat", (1, 2, 3, 4))]))
    annotations = load_annotations(tmp_path)
    assert annotations.format == "voc"
    assert annotations.for_image("a.jpg").objects == (AnnotatedObject(VOC_CLASSES.index("cat"), (1.0, 2.0, 3.0, 4.0)),)


@pytest.mark.parametrize("header", ["image,class,x0,y0,x1,y1\n", ""])
def test_plain_csv_several_rows_per_image(tmp_path, header):
    path = tmp_path / "boxes.csv"
    path.write_text(header + "birds/a.jpg,3,1,2,30,40\nbirds/a.jpg,7,5,6,7,8.5\nb.png,0,0,0,1,1\n")
    annotations = load_annotations(path)
    assert annotations.format == "csv" and annotations.key == "path" and len(annotations) == 2
    assert boxes_of(annotations.for_image("birds/a.jpg")) == [(3, (1.0, 2.0, 30.0, 40.0)), (7, (5.0, 6.0, 7.0, 8.5))]
    assert annotations.for_image("a.jpg") is None


def test_plain_csv_mask_column_is_relative_to_the_csv(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("a.jpg,3,1,2,30,40,masks/a.png\na.jpg,5,1,2,3,4,masks/a.png\n")
    annotation = load_annotations(path).for_image("a.jpg")
    assert annotation.mask == str(tmp_path / "masks" / "a.png")
    assert (annotation.mask_value(3), annotation.mask_value(5), annotation.mask_value(4)) == (4, 6, None)


def test_synset_list_counts_lines(tmp_path):
    assert read_synsets(write_synsets(tmp_path)) == {line.split()[0]: k for k, line in enumerate(SYNSETS)}


def message(excinfo):
    return str(excinfo.value)


def test_malformed_xml_names_its_line(tmp_path):
    write_synsets(tmp_path)
    text = voc_xml("ILSVRC2012_val_00000001", [("n01440764", (1, 2, 3, 4))])
    (tmp_path / "ILSVRC2012_val_00000001.xml").write_text(text.replace("</bndbox>", "</bndbx>"))
    with pytest.raises(AnnotationError) as excinfo:
        load_annotations(tmp_path)
    line = text.splitlines().index("\t\t</bndbox>") + 1
    assert f"line {line}" in message(excinfo) and "not well-formed" in message(excinfo)


def test_unknown_synset_and_bad_number_name_their_lines(tmp_path):
    write_synsets(tmp_path)
    text = voc_xml("ILSVRC2012_val_00000001", [("n01440764", (1, 2, 3, 4)), ("n09999999", (1, 2, 3, 4))])
    path = tmp_path / "ILSVRC2012_val_00000001.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError) as excinfo:
        load_annotations(tmp_path)
    lines = text.splitlines()
    assert f"line {lines.index('		<name>n09999999</name>') + 1}" in message(excinfo) and "n09999999" in message(excinfo)
    path.write_text(text.replace("<ymax>4</ymax>", "<ymax>four</ymax>", 1))
    with pytest.raises(AnnotationError, match=rf"line {lines.index('			<ymax>4</ymax>') + 1}: <ymax> is 'four'"):
        load_annotations(tmp_path)


def test_imagenet_without_a_synset_list_says_how_to_pass_one(tmp_path):
    (tmp_path / "x.xml").write_text(voc_xml("x", [("n01440764", (1, 2, 3, 4))]))
    with pytest.raises(AnnotationError, match="pass synsets=PATH"):
        load_annotations(tmp_path)


def test_solution_csv_errors_name_their_lines(tmp_path):
    write_synsets(tmp_path)
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\nA,n01440764 0 0 10 20\nB,n01440764 0 0 10\n")
    with pytest.raises(AnnotationError, match=r"line 3: the prediction string holds 4 values"):
        load_annotations(path)
    path.write_text("ImageId,PredictionString\nA,n01440764 0 0 10 20 n01440764 9 9 1 1\n")
    with pytest.raises(AnnotationError, match=r"line 2: box \(9, 9, 1, 1\) ends before it starts"):
        load_annotations(path)


def test_cub_errors_name_the_file_and_line(tmp_path):
    write_cub(tmp_path, [(1, "a/b.jpg", (1, 2, 3, 4), 1), (2, "a/c.jpg", (1, 2, 3, 4), 2)])
    (tmp_path / "bounding_boxes.txt").write_text("1 1 2 3 4\n2 1 2 3\n")
    with pytest.raises(AnnotationError, match=r"bounding_boxes.txt, line 2: 4 fields, not 5"):
        load_annotations(tmp_path)
    (tmp_path / "bounding_boxes.txt").write_text("1 1 2 3 4\n")
    with pytest.raises(AnnotationError, match=r"bounding_boxes.txt: image id 2 \(images.txt line 2\) is missing"):
        load_annotations(tmp_path)
    write_cub(tmp_path, [(1, "a/b.jpg", (1, 2, 3, 4), 0)])
    with pytest.raises(AnnotationError, match=r"image_class_labels.txt, line 1: class '0'"):
        load_annotations(tmp_path)


def test_plain_csv_errors_name_their_lines(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("image,class,x0,y0,x1,y1\na.jpg,1,0,0,5,5\n\nb.jpg,1,0,zero,5,5\n")
    with pytest.raises(AnnotationError, match=r"boxes.csv, line 4: a box corner is 'zero'"):
        load_annotations(path)
    path.write_text("a.jpg,1,0,0,5\n")
    with pytest.raises(AnnotationError, match=r"line 1: 5 fields"):
        load_annotations(path)
    path.write_text("a.jpg,cat,0,0,5,5\n")
    with pytest.raises(AnnotationError, match=r"line 1: class 'cat' is not an index"):
        load_annotations(path)


def test_wrong_inputs_say_what_to_pass(tmp_path):
    with pytest.raises(AnnotationError, match="does not exist"):
        load_annotations(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AnnotationError, match="not an annotation format"):
        load_annotations(tmp_path / "notes.txt")
    with pytest.raises(AnnotationError, match="holds no .xml file"):
        load_annotations(tmp_path)
    write_cub(tmp_path, [(1, "a/b.jpg", (1, 2, 3, 4), 1)])
    with pytest.raises(AnnotationError, match="leave synsets out"):
        load_annotations(tmp_path, synsets={"n01440764": 0})
    with pytest.raises(AnnotationError, match="class_names is for Pascal VOC"):
        load_annotations(tmp_path, class_names=["bird"])

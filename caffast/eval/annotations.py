"""Localization annotations in the formats benchmarks ship, each read into one common form.

Every reader returns an :class:`Annotations`: for each image, its objects (a 0-based class index,
the model output's column, and a box) and, where the dataset has one, the path of a mask.

Boxes are ``(x0, y0, x1, y1)`` in the original image's pixels, the numbers the file gives (CUB's
``x y width height`` become ``x, y, x + width, y + height``).  Pascal VOC and ImageNet count
inclusive pixel indices; the protocol reads every box as continuous corners, a difference of at
most one pixel, as the CAM evaluation code does.

Formats, and how an image is matched to its annotation (:meth:`Annotations.for_image`):

- ImageNet validation XML files (Pascal VOC layout, one per image) with ``LOC_synset_mapping.txt``
  (line k, ``n01440764 tench, Tinca tinca``, gives class k): keyed by the file stem;
- ImageNet's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, groups of
  ``synset x0 y0 x1 y1``) with the same synset list: keyed by the file stem;
- CUB-200-2011 (``images.txt``, ``bounding_boxes.txt``, ``image_class_labels.txt``): keyed by the
  path in ``images.txt``, relative to CUB's ``images/`` folder (explain that folder); the file's
  1-based class c is class index c - 1;
- Pascal VOC (``Annotations/*.xml`` with class names): keyed by the file stem; a name's class index
  is its position in :data:`VOC_CLASSES` or in a list the caller gives; ``SegmentationClass/<stem>.png``,
  where it exists, is the image's mask;
- a plain CSV, one object a row: ``image,class,x0,y0,x1,y1`` and optionally ``mask``, a header row
  optional: keyed by the image path as written (relative to the folder that is explained).

A mask is a label image (VOC's SegmentationClass layout): the pixels of class index c hold the value
:meth:`ImageAnnotation.mask_value` gives for c (VOC's class number for VOC, c + 1 for the CSV); 0 is
background and other values (VOC's 255 border) belong to no class.
"""

from __future__ import annotations

import csv
import math
import os
import re
import xml.parsers.expat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping, Optional, Sequence, Union

__all__ = [
    "VOC_CLASSES",
    "AnnotatedObject",
    "AnnotationError",
    "Annotations",
    "Box",
    "ImageAnnotation",
    "load_annotations",
    "read_box_csv",
    "read_cub",
    "read_imagenet_solution",
    "read_imagenet_xml",
    "read_synsets",
    "read_voc",
]

PathLike = Union[str, os.PathLike]
Box = tuple[float, float, float, float]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
SYNSET_FILE = "LOC_synset_mapping.txt"
SOLUTION_HEADER = ("ImageId", "PredictionString")
CUB_FILES = ("images.txt", "bounding_boxes.txt", "image_class_labels.txt")
_SYNSET = re.compile(r"n\d{8}")
_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


class AnnotationError(ValueError):
    """An annotation file that cannot be read; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class AnnotatedObject:
    """One object: its class index (0-based, the model output's column) and its box."""

    class_index: int
    box: Box


@dataclass(frozen=True)
class ImageAnnotation:
    """The objects of one image, its size where the file states it, and its mask where one exists.

    ``mask_labels`` pairs each class index with the mask value that marks its pixels.
    """

    key: str
    objects: tuple[AnnotatedObject, ...]
    size: Optional[tuple[int, int]] = None  # (width, height)
    mask: Optional[str] = None
    mask_labels: tuple[tuple[int, int], ...] = ()

    @property
    def classes(self) -> frozenset[int]:
        """The class indices of the image's objects."""
        return frozenset(obj.class_index for obj in self.objects)

    def boxes(self, class_index: int) -> list[Box]:
        """The boxes of the objects of one class, in file order."""
        return [obj.box for obj in self.objects if obj.class_index == class_index]

    def mask_value(self, class_index: int) -> Optional[int]:
        """The mask value marking `class_index`, or None when the mask does not mark that class."""
        return dict(self.mask_labels).get(class_index) if self.mask is not None else None


@dataclass(frozen=True)
class Annotations:
    """The annotations of a dataset, by key: the file stem ("stem") or the relative path ("path")."""

    format: str
    key: str
    images: Mapping[str, ImageAnnotation] = field(repr=False)

    def key_of(self, image: str) -> str:
        """The key an image path (as `caffast run` names it, relative to the explained folder) matches."""
        path = PurePosixPath(image.replace("\\", "/"))
        return path.stem if self.key == "stem" else path.as_posix()

    def for_image(self, image: str) -> Optional[ImageAnnotation]:
        """The annotation of an image path, or None when the dataset has none for it."""
        return self.images.get(self.key_of(image))

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageAnnotation]:
        return iter(self.images.values())


# ----------------------------------------------------------------------------------------------
# shared parsing


def _error(path: PathLike, line: Optional[int], problem: str, fix: str) -> AnnotationError:
    where = f"{os.fspath(path)}, line {line}" if line is not None else os.fspath(path)
    return AnnotationError(f"{where}: {problem}: {fix}")


def _number(text: str, path: PathLike, line: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(path, line, f"{what} is {text.strip()!r}, not a number", "write it as a plain number") from None
    if not math.isfinite(value):
        raise _error(path, line, f"{what} is {text.strip()!r}", "write a finite number")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _box(corners: Sequence[float], path: PathLike, line: int) -> Box:
    x0, y0, x1, y1 = corners
    if x1 < x0 or y1 < y0:
        raise _error(path, line, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) ends before it starts",
                     "write the corners as x0 y0 x1 y1, the top-left one first")  # fmt: skip
    return (x0, y0, x1, y1)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise _error(path, None, "does not exist", "pass the path of an existing file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise _error(path, None, f"not UTF-8 text ({error.reason})", "save it as UTF-8") from None


class _Node:
    """An XML element with the line it starts on, which ElementTree does not keep."""

    def __init__(self, tag: str, line: int) -> None:
        self.tag, self.line, self.children, self.parts = tag, line, [], []

    @property
    def text(self) -> str:
        return "".join(self.parts).strip()

    def find(self, tag: str) -> Optional["_Node"]:
        return next((child for child in self.children if child.tag == tag), None)

    def find_all(self, tag: str) -> list["_Node"]:
        return [child for child in self.children if child.tag == tag]


def _parse_xml(path: Path) -> _Node:
    parser = xml.parsers.expat.ParserCreate()
    stack: list[_Node] = [_Node("", 0)]

    def start(tag: str, _attributes: dict) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _tag: stack.pop()
    parser.CharacterDataHandler = lambda data: stack[-1].parts.append(data)
    try:
        parser.Parse(path.read_bytes(), True)
    except xml.parsers.expat.ExpatError as error:
        raise _error(path, error.lineno, f"not well-formed XML ({xml.parsers.expat.ErrorString(error.code)})",
                     "fix or replace the file")  # fmt: skip
    return stack[0].children[0]


def _child(node: _Node, tag: str, path: Path) -> _Node:
    found = node.find(tag)
    if found is None:
        raise _error(path, node.line, f"<{node.tag}> has no <{tag}>", f"add its <{tag}> element")
    return found


def _xml_size(root: _Node, path: Path) -> Optional[tuple[int, int]]:
    size = root.find("size")
    if size is None:
        return None
    width, height = (_child(size, tag, path) for tag in ("width", "height"))
    return (int(_number(width.text, path, width.line, "<width>")),
            int(_number(height.text, path, height.line, "<height>")))  # fmt: skip


def _xml_objects(root: _Node, path: Path) -> Iterator[tuple[str, int, Box]]:
    """(name, line, box) of each <object> of a VOC-layout annotation."""
    for obj in root.find_all("object"):
        name = _child(obj, "name", path)
        bndbox = _child(obj, "bndbox", path)
        corners = []
        for tag in _BOX_TAGS:
            element = _child(bndbox, tag, path)
            corners.append(_number(element.text, path, element.line, f"<{tag}>"))
        yield name.text, name.line, _box(corners, path, bndbox.line)


def _xml_files(folder: Path) -> list[Path]:
    files = sorted(path for path in folder.glob("*.xml") if path.is_file())
    if not files:
        raise _error(folder, None, "holds no .xml file", "pass the folder of the annotation XML files")
    return files


def _find_upwards(start: Path, name: str) -> Optional[Path]:
    """`name` in `start` or the nearest folder above it (ImageNet's layout keeps the synset list at its root)."""
    for folder in (start, *start.parents):
        if (folder / name).is_file():
            return folder / name
    return None


def _synset_index(synsets: Union[PathLike, Mapping[str, int], None], near: Path) -> tuple[dict[str, int], str]:
    """The synset -> class index mapping, and where it came from (for messages)."""
    if isinstance(synsets, Mapping):
        return dict(synsets), "the synsets given"
    path = Path(synsets) if synsets is not None else _find_upwards(near, SYNSET_FILE)
    if path is None:
        raise _error(near, None, f"no {SYNSET_FILE} in this folder or above it",
                     f"pass synsets=PATH of ImageNet's {SYNSET_FILE} (line k names class k)")  # fmt: skip
    return read_synsets(path), os.fspath(path)


# ----------------------------------------------------------------------------------------------
# the readers


def read_synsets(path: PathLike) -> dict[str, int]:
    """ImageNet's LOC_synset_mapping.txt as {synset: class index}: line k (from 0) gives class k."""
    path = Path(path)
    lines = _read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _error(path, None, "is empty", f"pass ImageNet's {SYNSET_FILE}, one 'n01440764 tench, ...' per line")
    index: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        synset = text.split(maxsplit=1)[0] if text.strip() else ""
        if not _SYNSET.fullmatch(synset):
            raise _error(path, number, f"{text.strip()!r} does not start with a synset such as n01440764",
                         "each line is a synset and its names; line k is class k, so none may be blank")  # fmt: skip
        if synset in index:
            raise _error(path, number, f"synset {synset} is listed again (first on line {index[synset] + 1})",
                         "list each synset once")  # fmt: skip
        index[synset] = number - 1
    return index


def _read_xml_folder(
    folder: Path, fmt: str, class_of: Mapping[str, int], unknown: str, mask_dir: Optional[Path] = None,
    mask_numbers: Optional[Mapping[str, int]] = None,
) -> Annotations:  # fmt: skip
    """VOC-layout XML files, one per image, keyed by file stem; `class_of` maps an object's name."""
    images = {}
    for path in _xml_files(folder):
        root = _parse_xml(path)
        objects, labels = [], {}
        for name, line, box in _xml_objects(root, path):
            if name not in class_of:
                raise _error(path, line, f"object name {name!r} is not among {unknown}",
                             "pass the class list this dataset uses")  # fmt: skip
            objects.append(AnnotatedObject(class_of[name], box))
            if mask_numbers is not None and name in mask_numbers:
                labels[class_of[name]] = mask_numbers[name]
        mask = mask_dir / f"{path.stem}.png" if mask_dir is not None else None
        has_mask = mask is not None and mask.is_file()
        images[path.stem] = ImageAnnotation(
            path.stem, tuple(objects), _xml_size(root, path), os.fspath(mask) if has_mask else None,
            tuple(sorted(labels.items())) if has_mask else (),
        )  # fmt: skip
    return Annotations(fmt, "stem", images)


def read_imagenet_xml(folder: PathLike, synsets: Union[PathLike, Mapping[str, int], None] = None) -> Annotations:
    """A folder of ImageNet validation XML files; `synsets` is LOC_synset_mapping.txt (by default the
    one in the folder or the nearest folder above it) or a ready {synset: class index}."""
    folder = Path(folder)
    class_of, source = _synset_index(synsets, folder)
    return _read_xml_folder(folder, "imagenet-xml", class_of, f"the synsets of {source}")


def read_voc(folder: PathLike, class_names: Optional[Sequence[str]] = None) -> Annotations:
    """Pascal VOC: a VOC root (holding Annotations/) or a folder of its XML files; an image's mask is
    SegmentationClass/<stem>.png beside the XML folder, where it exists.  Class index i is
    class_names[i], VOC's 20 classes by default."""
    folder = Path(folder)
    names = tuple(VOC_CLASSES if class_names is None else class_names)
    if len(set(names)) != len(names):
        repeated = ", ".join(sorted({name for name in names if names.count(name) > 1}))
        raise AnnotationError(f"class_names lists {repeated} twice: list each class once, in the model's output order")
    xml_dir = folder / "Annotations" if (folder / "Annotations").is_dir() else folder
    mask_dir = xml_dir.parent / "SegmentationClass"
    voc_numbers = {name: number for number, name in enumerate(VOC_CLASSES, start=1)}
    described = "VOC's 20 classes" if class_names is None else "the class_names given"
    class_of = {name: index for index, name in enumerate(names)}
    return _read_xml_folder(xml_dir, "voc", class_of, described, mask_dir, voc_numbers)


def read_imagenet_solution(path: PathLike, synsets: Union[PathLike, Mapping[str, int], None] = None) -> Annotations:
    """ImageNet's LOC_val_solution.csv; `synsets` as in :func:`read_imagenet_xml`."""
    path = Path(path)
    class_of, source = _synset_index(synsets, path.parent)
    images: dict[str, ImageAnnotation] = {}
    rows = _csv_rows(path)
    number, header = next(rows, (1, []))
    if tuple(field.strip() for field in header) != SOLUTION_HEADER:
        raise _error(path, number, f"the header is {','.join(header)!r}",
                     "the first line of LOC_val_solution.csv is ImageId,PredictionString")  # fmt: skip
    for number, row in rows:
        if len(row) != 2:
            raise _error(path, number, f"{len(row)} fields", "each line is ImageId,PredictionString")
        key, tokens = row[0].strip(), row[1].split()
        if len(tokens) % 5 or not tokens:
            raise _error(path, number, f"the prediction string holds {len(tokens)} values, not groups of five",
                         "write 'synset x0 y0 x1 y1' for each box")  # fmt: skip
        if key in images:
            raise _error(path, number, f"image {key} is listed again", "give each image one line, all its boxes in it")
        objects = []
        for start in range(0, len(tokens), 5):
            synset = tokens[start]
            if synset not in class_of:
                raise _error(path, number, f"synset {synset!r} is not in {source}",
                             "pass the synset list of this dataset")  # fmt: skip
            corners = [_number(value, path, number, "a box corner") for value in tokens[start + 1 : start + 5]]
            objects.append(AnnotatedObject(class_of[synset], _box(corners, path, number)))
        images[key] = ImageAnnotation(key, tuple(objects))
    return Annotations("imagenet-csv", "stem", images)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file with the line each starts on."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            line = 1
            for row in reader:
                if any(field.strip() for field in row):
                    yield line, row
                line = reader.line_num + 1
    except UnicodeDecodeError as error:
        raise _error(path, None, f"not UTF-8 text ({error.reason})", "save it as UTF-8") from None
    except csv.Error as error:
        raise _error(path, None, f"not valid CSV ({error})", "fix the quoting") from None


def _cub_table(path: Path, fields: int, layout: str) -> dict[str, tuple[int, list[str]]]:
    """A CUB text file as {image id: (line number, the other fields)}; the last field may hold spaces."""
    table = {}
    for number, text in enumerate(_read_lines(path), start=1):
        if not text.strip():
            continue
        row = text.split(maxsplit=fields - 1)
        if len(row) != fields or (fields > 2 and len(text.split()) != fields):
            raise _error(path, number, f"{len(text.split())} fields, not {fields}", f"each line is {layout}")
        if row[0] in table:
            raise _error(path, number, f"image id {row[0]} is listed again", "list each image id once")
        table[row[0]] = (number, row[1:])
    return table


def read_cub(folder: PathLike) -> Annotations:
    """CUB-200-2011's folder (images.txt, bounding_boxes.txt, image_class_labels.txt); the file's
    class c (1-based) is class index c - 1, the column of a 200-way model output."""
    folder = Path(folder)
    missing = [name for name in CUB_FILES if not (folder / name).is_file()]
    if missing:
        raise _error(folder, None, f"has no {', '.join(missing)}", "pass the CUB_200_2011 folder that holds them")
    image_file, box_file, label_file = (folder / name for name in CUB_FILES)
    paths = _cub_table(image_file, 2, "an image id and its path")
    boxes = _cub_table(box_file, 5, "an image id and its box: x y width height")
    labels = _cub_table(label_file, 2, "an image id and its class, 1 to 200")
    images = {}
    for image_id, (number, (relative,)) in paths.items():
        for path, table in ((box_file, boxes), (label_file, labels)):
            if image_id not in table:
                raise _error(path, None, f"image id {image_id} ({image_file.name} line {number}) is missing",
                             "use the three files of one CUB release")  # fmt: skip
        box_line, values = boxes[image_id]
        x, y, width, height = (_number(value, box_file, box_line, "a box value") for value in values)
        label_line, (label,) = labels[image_id]
        if not label.isdigit() or int(label) < 1:
            raise _error(label_file, label_line, f"class {label!r} is not a number from 1",
                         "CUB's classes are 1 to 200")  # fmt: skip
        key = PurePosixPath(relative.strip()).as_posix()
        box = _box((x, y, x + width, y + height), box_file, box_line)
        images[key] = ImageAnnotation(key, (AnnotatedObject(int(label) - 1, box),))
    return Annotations("cub", "path", images)


def read_box_csv(path: PathLike) -> Annotations:
    """A plain CSV, one object a row: image,class,x0,y0,x1,y1[,mask], a header row optional.

    The image and the mask are paths, the image's relative to the explained folder, the mask's
    relative to the CSV's folder; an image's rows name one mask or none.
    """
    path = Path(path)
    objects: dict[str, list[AnnotatedObject]] = {}
    masks: dict[str, Optional[str]] = {}
    for count, (number, row) in enumerate(_csv_rows(path)):
        if count == 0 and not any(_is_number(value) for value in row[1:]):
            continue  # the header: no number after the image column
        if len(row) not in (6, 7):
            raise _error(path, number, f"{len(row)} fields", "each row is image,class,x0,y0,x1,y1 and optionally mask")
        image, label = row[0].strip(), row[1].strip()
        if not label.isdigit():
            raise _error(path, number, f"class {label!r} is not an index", "write the 0-based class index")
        corners = [_number(value, path, number, "a box corner") for value in row[2:6]]
        key = PurePosixPath(image.replace("\\", "/")).as_posix()
        objects.setdefault(key, []).append(AnnotatedObject(int(label), _box(corners, path, number)))
        mask = os.fspath(path.parent / row[6].strip()) if len(row) == 7 and row[6].strip() else None
        if masks.setdefault(key, mask) != mask:
            raise _error(path, number, f"image {image} names a second mask", "give each image's rows the same mask")
    if not objects:
        raise _error(path, None, "holds no annotation row", "write one image,class,x0,y0,x1,y1 row per object")
    images = {}
    for key, found in objects.items():
        labels = tuple((c, c + 1) for c in sorted({obj.class_index for obj in found})) if masks[key] else ()
        images[key] = ImageAnnotation(key, tuple(found), None, masks[key], labels)
    return Annotations("csv", "path", images)


# ----------------------------------------------------------------------------------------------
# the entry point


def _first_object_name(files: list[Path]) -> Optional[str]:
    for path in files:
        for name, _line, _box in _xml_objects(_parse_xml(path), path):
            return name
    return None


def load_annotations(
    path: PathLike, synsets: Union[PathLike, Mapping[str, int], None] = None,
    class_names: Optional[Sequence[str]] = None,
) -> Annotations:  # fmt: skip
    """The annotations at `path`, the format recognized from it:

    - a CUB-200-2011 folder (it holds images.txt, bounding_boxes.txt and image_class_labels.txt);
    - a Pascal VOC root (it holds Annotations/);
    - a folder of XML files: ImageNet's when the object names are synsets (n01440764), VOC's otherwise;
    - a .csv file: ImageNet's LOC_val_solution.csv when its header is ImageId,PredictionString,
      a plain box CSV otherwise.

    `synsets` (ImageNet only) as in :func:`read_imagenet_xml`; `class_names` (VOC only) as in :func:`read_voc`.
    """
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"{os.fspath(path)} does not exist: pass an annotation folder or CSV file")
    if path.is_dir() and all((path / name).is_file() for name in CUB_FILES):
        fmt = "cub"
    elif path.is_dir() and (path / "Annotations").is_dir():
        fmt = "voc"
    elif path.is_dir():
        name = _first_object_name(_xml_files(path))
        fmt = "imagenet-xml" if name is not None and _SYNSET.fullmatch(name) else "voc"
    elif path.suffix.lower() == ".csv":
        first = next(_csv_rows(path), (1, []))[1]
        fmt = "imagenet-csv" if tuple(field.strip() for field in first) == SOLUTION_HEADER else "csv"
    else:
        raise AnnotationError(
            f"{os.fspath(path)} is not an annotation format caffast reads: pass a folder of ImageNet or VOC XML "
            "files, a VOC root, a CUB-200-2011 folder, ImageNet's LOC_val_solution.csv or a box CSV"
        )
    if synsets is not None and not fmt.startswith("imagenet"):
        raise AnnotationError(f"{os.fspath(path)} holds {fmt} annotations, which name no synsets: leave synsets out")
    if class_names is not None and fmt != "voc":
        raise AnnotationError(f"{os.fspath(path)} holds {fmt} annotations, whose classes are indices: "
                              "class_names is for Pascal VOC; leave it out")  # fmt: skip
    if fmt == "cub":
        return read_cub(path)
    if fmt == "voc":
        return read_voc(path, class_names)
    if fmt == "imagenet-xml":
        return read_imagenet_xml(path, synsets)
    if fmt == "imagenet-csv":
        return read_imagenet_solution(path, synsets)
    return read_box_csv(path)

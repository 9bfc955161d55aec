# Every target creates its own venv and needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all bench gendernet zoo onnx-zoo compat fetch proto clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[test,plot]'
	touch $(STAMP)

fetch: $(STAMP)
	$(PY) -m caffe_compress fetch gendernet

demo: $(STAMP)
	$(PY) -m caffe_compress fetch gendernet
	$(PY) tools/demo.py

# Two workers (the machine has 2 cores); the long GenderNet-sized end-to-end cases are marked slow.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) tools/bench.py --json bench.json

FACES ?= ../shared/data/utkface-dev
gendernet: $(STAMP)
	@test -d "$(FACES)" || { echo "make gendernet: no face directory at $(FACES); point FACES= at a folder of labelled faces: UTKFace crops named <age>_<gender>_<race>_<date>.jpg (gender 0 = male), Adience fold_*_data.txt with its faces, or male/ and female/ subfolders, e.g. make gendernet FACES=/data/utkface" >&2; exit 2; }
	$(PY) -m gendernet.reproduce --faces $(FACES) --rank fc6=8 --fp16 0.95 --calibrated 0.95,0.99

zoo: $(STAMP)
	$(PY) tools/zoo_eval.py

# --format onnx on GenderNet and the dev zoo; OpenCV 5 (in its own venv: it cannot sit beside OpenCV 4)
# loads each ONNX file too.
onnx-zoo: $(STAMP)
	test -x .venv-cv5/bin/python || { $(PYTHON) -m venv .venv-cv5 && .venv-cv5/bin/python -m pip --disable-pip-version-check -q install 'opencv-python-headless>=5,<6' onnxruntime numpy; }
	$(PY) tools/onnx_zoo.py --opencv5 .venv-cv5/bin/python

# The suite against the oldest and the newest dependencies setup.py allows.
COMPAT_OLD := numpy==1.26.4 protobuf==4.21.12 opencv-python-headless==4.5.5.64 threadpoolctl==3.5.0
compat:
	rm -rf .venv-compat-old .venv-compat-new
	$(PYTHON) -m venv .venv-compat-old
	.venv-compat-old/bin/python -m pip --disable-pip-version-check -q install $(COMPAT_OLD) -e '.[test]'
	.venv-compat-old/bin/python -m pytest -q tests
	$(PYTHON) -m venv .venv-compat-new
	.venv-compat-new/bin/python -m pip --disable-pip-version-check -q install --upgrade -e '.[test]'
	.venv-compat-new/bin/python -m pytest -q tests

proto: $(STAMP)
	$(PIP) install 'grpcio-tools>=1.60'
	$(PY) tools/gen_proto.py

clean:
	rm -rf $(VENV) .venv-compat-old .venv-compat-new .venv-cv5 out bench.json

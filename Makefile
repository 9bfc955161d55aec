# Every target creates its own venv and needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo test bench gendernet fetch proto clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[test,plot]'
	touch $(STAMP)

fetch: $(STAMP)
	$(PY) -m caffe_compress fetch gendernet

demo: $(STAMP)
	$(PY) -m caffe_compress fetch gendernet
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) tools/bench.py --json bench.json

gendernet: $(STAMP)
	$(PY) -m gendernet.reproduce --faces $(or $(FACES),../shared/data/utkface-dev) --rank fc6=8 --fp16 0.95 --calibrated 0.95,0.99

proto: $(STAMP)
	$(PIP) install 'grpcio-tools>=1.60'
	$(PY) tools/gen_proto.py

clean:
	rm -rf $(VENV) out bench.json

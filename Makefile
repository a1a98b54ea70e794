# Two commands do all set-up: `make train` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# train.yaml's default dataset_dir
DEMO_DIR := demo_data
# configs instantiate `scripts.*`; MONAI evaluates `$import scripts` before it adds the bundle root to sys.path
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE ?= 1

.PHONY: train test install demo-data clean dicom-tools

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: resolving it through another package would pull a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DIR)/datalist.json: | $(STAMP)
	$(PY) -m bundle demo-data --out $(DEMO_DIR)

demo-data: $(DEMO_DIR)/datalist.json

# the demo model goes to eval/demo_models: models/model.pt is the shipped QaTa-COV19 model
train: $(STAMP) $(DEMO_DIR)/datalist.json
	$(PY) -m monai.bundle run training --meta_file configs/metadata.json --config_file configs/train.yaml --bundle_root . \
		--ckpt_dir eval/demo_models

# the DICOM validator the SEG test runs (Debian's dicom3tools); best effort: without it that test is skipped, saying so
dicom-tools:
	@command -v dciodvfy >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ timeout 300 apt-get install -y -qq dicom3tools >/dev/null 2>&1 || \
		  { timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq dicom3tools >/dev/null 2>&1; }; }; } || \
		echo "dicom3tools not installed: the dciodvfy test will be skipped"

test: $(STAMP) dicom-tools
	$(PY) -m pytest tests -ra

clean:
	rm -rf eval dist $(DEMO_DIR)

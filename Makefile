# Two commands do all set-up: `make train` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# train.yaml's default dataset_dir
DEMO_DIR := demo_data
# `python -m bundle` and the tests import `bundle` and `scripts` from the repository root, wherever they run from
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE ?= 1

.PHONY: train test install demo-data clean test-packages

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

# Debian packages the tests run against, installed best effort: without apt-get and root the tests that need them
# are skipped, saying so. dicom3tools: the DICOM validator (dciodvfy) of the SEG test; orthanc + orthanc-dicomweb:
# the archive of the PACS round-trip tests
APT_INSTALL = timeout 300 apt-get install -y -qq $(1) >/dev/null 2>&1 || \
	{ timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq $(1) >/dev/null 2>&1; }
CAN_APT = command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]

test-packages:
	@command -v dciodvfy >/dev/null || { $(CAN_APT) && { $(call APT_INSTALL,dicom3tools); }; } || \
		echo "dicom3tools not installed: the dciodvfy test will be skipped"
	@{ command -v Orthanc >/dev/null && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } || \
		{ $(CAN_APT) && { $(call APT_INSTALL,orthanc orthanc-dicomweb); }; } || \
		echo "orthanc not installed: the PACS round-trip tests will be skipped"

test: $(STAMP) test-packages
	$(PY) -m pytest tests -ra

clean:
	rm -rf eval dist $(DEMO_DIR)

"""Docker label keys: the source of truth for what the farm created."""

from __future__ import annotations

PREFIX = "org.stapfarm"
OWNER = f"{PREFIX}.owner"  # the farm's resource prefix ("stapfarm", or a test's own)
KIND = f"{PREFIX}.kind"  # server | kernels | job | advertiser | endpoint | client
IMAGE_INPUTS = f"{PREFIX}.inputs-hash"  # hash of an image's build inputs
IMAGE_ARCH = f"{PREFIX}.image-arch"
CONFIG = f"{PREFIX}.config"  # a server's full configuration, JSON
SPEC_HASH = f"{PREFIX}.spec-hash"  # hash of a server's container spec
NICKNAME = f"{PREFIX}.nickname"
PORT = f"{PREFIX}.port"
RELEASES = f"{PREFIX}.releases"
STRATEGY = f"{PREFIX}.strategy"
TEST = f"{PREFIX}.test"  # set on everything a test creates, removed by the test's teardown
PROVISIONED = f"{PREFIX}.provisioned"  # on servers the endpoint started (it retires them)
OFFERS = f"{PREFIX}.offers"  # the endpoint's provisioning offers, ARCH:RELEASE words

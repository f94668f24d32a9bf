"""Image files: ``qemu-img`` and what a qcow2 header says."""

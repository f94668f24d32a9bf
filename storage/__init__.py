"""Storage domains, images and volumes (qemu-img, mounts)."""

"""The fault suite: Cedar on real servers under crashes, partitions, full disks and bad input."""

"""The chunked AES-256-GCM file transfer of SPEC §6: `upload_file` and `download_file`."""

"""The Emulab imagezip `.ndz` format, pure: headers, per-chunk codecs, chunk packing."""

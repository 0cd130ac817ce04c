"""`ebsfs get` and `ebsfs verify`: the verified copy, its manifest, resume record and
outputs."""

"""The EBS and EC2 services: the EbsApi interface, the one boto3 user, the direct GET
path (SigV4 + HTTP/1.1), the retry policy. Nothing here knows about trio or FUSE."""

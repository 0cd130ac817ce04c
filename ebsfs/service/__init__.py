"""The EBS and EC2 services: the EbsApi interface (api), the session and credentials
(session), the one error mapping (failures), the boto3 client (client) with its direct
GET path (direct: SigV4 + HTTP/1.1), EC2 metadata (ec2), the retry policy (retry).
Nothing here knows about trio, FUSE or the engine."""

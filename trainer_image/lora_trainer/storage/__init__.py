"""S3 for the trainer: s3:// inputs resolved to a local cache before a run, outputs mirrored back during it.

    uri.py       s3://bucket/prefix parsing; the key -> local path rule that refuses escapes
    client.py    the boto3 client from the standard AWS environment; error classification and retry
    download.py  parallel, verified, incremental download of a prefix into the cache
    store.py     put/get/list/delete with retries; parallel and multipart for large files
    upload.py    a background uploader with a bounded queue
    remote_checkpoints.py  complete checkpoints on S3, the newest one, keep-last-N
    mirror.py    the observer that mirrors the local output folder to its s3:// prefix
    stage.py     before a run: fail fast, download inputs, refuse finished outputs, fetch the resume checkpoint

The recipe only ever sees local folders; nothing here is imported unless a path is an s3:// URI.
"""

"""Set moto's server up for the least-privilege tests; run by moto's own venv Python.

    python moto_setup.py ENDPOINT BUCKET OUT.json

Creates BUCKET and two IAM users: 'uploader', whose only policy is s3:PutObject on
arn:aws:s3:::BUCKET/*, and 'admin' (everything), for the tests to read back what
landed. Also BUCKET-objects, with Object Lock, where the uploader may besides tag
objects and set their retention and legal hold (the tests of metadata, tags and Object
Lock). Then switches IAM enforcement on (POST /moto-api/reset-auth, body 0): from then
on every request must be signed by a known key and allowed by its policy.
Writes {"uploader": {"access", "secret"}, "admin": {...}} to OUT.json.
"""

import json
import sys
import urllib.request

import boto3


def main(endpoint, bucket, out):
    options = dict(endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
    boto3.client("s3", **options).create_bucket(Bucket=bucket)
    boto3.client("s3", **options).create_bucket(Bucket=bucket + "-objects",
                                                ObjectLockEnabledForBucket=True)
    iam = boto3.client("iam", **options)
    policies = {
        "uploader": {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:PutObject"],
            "Resource": ["arn:aws:s3:::%s/*" % bucket]}, {
            "Effect": "Allow", "Action": ["s3:PutObject", "s3:PutObjectTagging",
                                          "s3:PutObjectRetention", "s3:PutObjectLegalHold"],
            "Resource": ["arn:aws:s3:::%s-objects/*" % bucket]}]},
        "admin": {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "*", "Resource": "*"}]},
    }
    keys = {}
    for user, policy in policies.items():
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {"access": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    request = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0",
                                     method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=30).read()
    with open(out, "w") as handle:
        json.dump(keys, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])

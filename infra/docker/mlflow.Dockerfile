# The MLflow tracking server image (infra/k8s/mlflow.yaml): the official MLflow image of the
# project's MLflow version plus the PostgreSQL driver (psycopg 3: SQLAlchemy 2.1 resolves
# postgresql:// and postgresql+psycopg:// to it) and boto3 for S3 artifacts, from a hash-checked
# lock file. Nothing is installed when the pod starts. Built by infra/docker/build.sh.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY infra/docker/mlflow-requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.lock \
    && python -c "import mlflow, psycopg, boto3; assert mlflow.__version__ == '3.17.2'"

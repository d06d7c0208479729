# The image every pod of k8s/rayjob.yaml runs: Ray's GPU image with raycnn installed.
#
#   python -m raycnn.provenance                # REVISION: the git revision every result row records
#   docker build -t REGISTRY/raycnn:TAG .
#
# Ray's image, at the Ray of constraints.txt (cluster.yaml runs the same one). It runs as the
# non-root user `ray` (uid 1000, gid 100) with Python in /home/ray/anaconda3.
FROM rayproject/ray:2.60.0-py311-gpu

# The base image gives `ray` passwordless sudo; nothing here needs root at run time.
USER root
RUN gpasswd -d ray sudo && sed -i '/^ray ALL=/d' /etc/sudoers
USER 1000:100
# Fails the build if `ray` can still become root.
RUN ! sudo -n true 2>/dev/null

# Same as the driver sets for itself: no usage reports from the cluster's processes.
ENV RAY_USAGE_STATS_ENABLED=0

WORKDIR /home/ray/raycnn

# Dependencies first, from pyproject.toml's list and constraints.txt's pins (torch, torchvision,
# Ray: the single source of those versions), so editing the code reuses this layer.
COPY --chown=1000:100 pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project. Editable, as cluster.yaml installs it: the package stays beside the REVISION file
# that provenance reads from the project root (a plain install would move it to site-packages).
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir -c constraints.txt -e . && raycnn list > /dev/null

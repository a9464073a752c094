"""An emulated Kubernetes API server with a Job controller and a kubelet that runs containers as local processes.

No real API server can run on the test machines, so the ``kubernetes_jobs`` tests talk to this one, over real HTTP,
with the official ``kubernetes`` client. It serves what that client and ``kubectl``-style tooling use for Jobs:

* ``batch/v1`` Jobs and ``v1`` Pods, Secrets and Namespaces: create, get, list, watch (resource versions, history,
  410 Gone for expired versions, label and field selectors, paging), replace, patch (JSON, merge and strategic
  merge), delete (foreground, background and orphan propagation; graceful pod deletion), ``dryRun``.
* The server's own work: metadata (uid, namespace, resourceVersion, generation, creationTimestamp, generateName),
  defaults (Job and pod spec defaults, the Job's selector and ``job-name`` labels), validation of every submitted
  body by ``kubernetes-validate`` against one Kubernetes version plus the semantic checks the schema cannot express
  (names, labels, restart policy, env vars, Secret size, immutability), refusing invalid bodies with the API
  server's 422 ``Invalid`` Status, and ``fieldValidation`` (Strict/Warn/Ignore) for unknown fields.
* A Job controller (pods per ``parallelism``/``completions``, ``backoffLimit``, ``activeDeadlineSeconds``,
  conditions ``Complete``/``Failed`` with their reasons, ``ttlSecondsAfterFinished``) and a garbage collector
  (``ownerReferences``).
* A scheduler with one node (``nodeSelector`` is honoured: a pod that matches no node stays ``Unschedulable``) and a
  kubelet: image "pulls" (only images given with ``--image`` exist; others go ``ErrImagePull``/``ImagePullBackOff``),
  env resolution (``secretKeyRef``, ``fieldRef``, ``$(VAR)``), the container's command run as a local process with
  its output captured as the container log (``/log`` with ``tailLines``/``limitBytes``), container states and exit
  codes (``StartError`` 128 when the command cannot be executed), termination messages
  (``FallbackToLogsOnError``), and SIGTERM then SIGKILL after the grace period when a pod is deleted.

Timings are compressed (image pull back-off and pod re-creation back-off start at half a second, not ten). Run it with
``python -m tests.services.k8s_emulator --port 8443 --token secret --image my/worker:1``.
"""

#: The Kubernetes version whose schemas (``kubernetes-validate``) every submitted body must satisfy.
DEFAULT_KUBERNETES_VERSION = "1.31"
#: The emulated cluster's only node.
NODE_NAME = "emulated-node"

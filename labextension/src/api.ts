/**
 * The server extension's API (/gpu-attach/api/...), called with the Jupyter session's own
 * credentials: the browser never holds a broker token.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface ISlice {
  lease: string;
  mine: boolean;
  session: string | null;
  label: string;
  memory: number | null;
}

export interface IGpu {
  id: string;
  agent: string;
  agent_state: string;
  model: string;
  simulated: boolean;
  pool: string;
  memory: number;
  used_memory: number;
  free_memory: number;
  used_share: number;
  leases: string[];
  slices: ISlice[];
  history: [number, number][];
}

/** Set on a lease granted above a quota that may borrow idle capacity (the broker's numbers). */
export interface IBorrowed {
  resource: string;
  asked: number;
  in_use: number;
  limit: number;
  note?: string;
  quota?: { kind: string; subject: string };
}

export interface ILease {
  id: string;
  state: string;
  session: string;
  label: string;
  gpus: string[];
  fraction: number | null;
  memory_per_gpu: number;
  notebook: string | null;
  kernel_id: string | null;
  age_s: number;
  size: string;
  position?: number | null;
  of?: number | null;
  borrowed?: IBorrowed | null;
}

export interface IState {
  broker: { url: string; embedded: boolean };
  refresh_interval: number;
  pool: { gpus: IGpu[]; simulated: boolean; time: number };
  leases: ILease[];
}

/** An error the panel shows as a message that says what to do. */
export class GpuAttachError extends Error {
  constructor(message: string, readonly status: number) {
    super(message);
  }
}

export const NOT_ENABLED =
  'The jupyter-gpu-attach server extension is not running in this Jupyter server. ' +
  'Run `jupyter server extension enable jupyter_gpu_attach.server_extension` ' +
  '(or reinstall with `pip install jupyter-gpu-attach`), then restart JupyterLab.';

export async function requestAPI<T>(endPoint: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'gpu-attach', 'api', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new GpuAttachError(
      `Cannot reach the Jupyter server (${error}). Is it still running?`,
      0
    );
  }
  const text = await response.text();
  let data: any = text;
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    // a non-JSON answer: a proxy's error page, or a server without this extension
  }
  if (!response.ok) {
    if (response.status === 404 && !(data && data.detail)) {
      throw new GpuAttachError(NOT_ENABLED, 404);
    }
    const detail = (data && (data.detail || data.message)) || response.statusText;
    const hint =
      response.status === 502
        ? ' The GPU broker is down or refused the server: check that it runs, or unset ' +
          'GPU_ATTACH_BROKER_URL to use the embedded one, then restart JupyterLab.'
        : '';
    throw new GpuAttachError(`${detail}${hint}`, response.status);
  }
  return data as T;
}

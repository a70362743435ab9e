/**
 * One poll of the server extension's state, shared by the sidebar panel and the status bar.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { Poll } from '@lumino/polling';

import { GpuAttachError, IBorrowed, IGpu, ILease, IState, requestAPI } from './api';

export class GpuModel {
  constructor(options: { isNeeded: () => boolean }) {
    this._poll = new Poll<IState | null, Error>({
      factory: () => this._fetch(),
      frequency: { interval: 2000, backoff: true, max: 30 * 1000 },
      // Stand by while the browser tab is hidden or nothing that shows the state is visible.
      standby: () => document.hidden || !options.isNeeded(),
      name: 'jupyter-gpu-attach:state'
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get state(): IState | null {
    return this._state;
  }

  get error(): GpuAttachError | null {
    return this._error;
  }

  /** When the state was fetched (ms since epoch), so ages keep counting between polls. */
  get fetchedAt(): number {
    return this._fetchedAt;
  }

  refresh(): Promise<void> {
    return this._poll.refresh();
  }

  /** The live lease that a notebook's kernel holds, if any. */
  leaseOfKernel(kernelId: string | undefined | null): ILease | null {
    if (!kernelId || !this._state) {
      return null;
    }
    return (
      this._state.leases.find(
        l => l.kernel_id === kernelId && (l.state === 'granted' || l.state === 'queued')
      ) || null
    );
  }

  gpu(id: string): IGpu | undefined {
    return this._state?.pool.gpus.find(g => g.id === id);
  }

  dispose(): void {
    this._poll.dispose();
  }

  private async _fetch(): Promise<IState | null> {
    try {
      const state = await requestAPI<IState>('state');
      this._state = state;
      this._error = null;
      this._fetchedAt = Date.now();
      const interval = Math.max(500, state.refresh_interval * 1000);
      if (this._poll.frequency.interval !== interval) {
        this._poll.frequency = { ...this._poll.frequency, interval };
      }
      this._changed.emit();
      return state;
    } catch (error) {
      this._error =
        error instanceof GpuAttachError
          ? error
          : new GpuAttachError(String(error), 0);
      this._changed.emit();
      throw error; // the poll backs off
    }
  }

  private _poll: Poll<IState | null, Error>;
  private _state: IState | null = null;
  private _error: GpuAttachError | null = null;
  private _fetchedAt = 0;
  private _changed = new Signal<this, void>(this);
}

/** "H100" from "NVIDIA H100 80GB HBM3"; "simulated GPU" for the CPU stand-in. */
export function shortModel(model: string, simulated: boolean): string {
  if (simulated && /simulated/i.test(model)) {
    return 'simulated GPU';
  }
  const m = model.replace(/^NVIDIA\s+/i, '').match(/[A-Z]+\d{2,}[A-Za-z]*/);
  return m ? m[0] : model;
}

export function formatAge(seconds: number): string {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) {
    return `${seconds} s`;
  }
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m} min ${seconds % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n >= 10 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

/** "0.25 × H100" for a share of one GPU, "2 × H100" for whole GPUs. */
export function describeLease(model: GpuModel, lease: ILease): string {
  const gpu = model.gpu(lease.gpus[0]);
  const name = gpu ? shortModel(gpu.model, gpu.simulated) : 'GPU';
  const frac = lease.fraction;
  if (frac === null || frac === undefined || frac >= 1 || lease.gpus.length > 1) {
    return `${lease.gpus.length} × ${name}`;
  }
  return `${Number(frac.toPrecision(2))} × ${name}`;
}

/** "above your share quota (0.4 in use + 0.2 > 0.5): stopped at its next renewal once someone waits" */
export function describeBorrowed(b: IBorrowed): string {
  const amount = (n: number): string => (b.resource === 'memory' ? formatBytes(n) : String(n));
  const whose = b.quota ? `${b.quota.kind} ${b.quota.subject}'s` : 'your';
  return (
    `Borrowed: granted above ${whose} ${b.resource} quota (${amount(b.in_use)} in use + ${amount(b.asked)} ` +
    `asked > ${amount(b.limit)}) on idle capacity. It is not renewed once another request waits, so a long ` +
    'cell may be stopped.'
  );
}

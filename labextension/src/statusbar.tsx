/**
 * The status-bar item for the current notebook: "GPU: idle" between cells, "GPU: 0.25 × H100 · 12 s"
 * while one of its cells holds a lease. Clicking it opens the panel.
 */
import * as React from 'react';

import { INotebookTracker } from '@jupyterlab/notebook';
import { ReactWidget } from '@jupyterlab/ui-components';

import { GpuModel, describeLease, formatAge } from './model';

export function statusText(model: GpuModel, kernelId: string | undefined | null): string {
  if (model.error) {
    return 'GPU: unavailable';
  }
  const lease = model.leaseOfKernel(kernelId);
  if (!lease) {
    return 'GPU: idle';
  }
  if (lease.state === 'queued') {
    return lease.position !== null && lease.position !== undefined ? `GPU: queued #${lease.position}` : 'GPU: queued';
  }
  const age = lease.age_s + (Date.now() - model.fetchedAt) / 1000;
  return `GPU: ${describeLease(model, lease)}${lease.borrowed ? ' (borrowed)' : ''} · ${formatAge(age)}`;
}

export class GpuStatus extends ReactWidget {
  constructor(private model: GpuModel, private tracker: INotebookTracker | null, private open: () => void) {
    super();
    this.addClass('jp-GpuAttach-status');
    model.changed.connect(() => this.update(), this);
    tracker?.currentChanged.connect(() => this.update(), this);
    // Ages tick between polls.
    this._timer = window.setInterval(() => this.update(), 1000);
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  render(): JSX.Element {
    const kernelId = this.tracker?.currentWidget?.sessionContext.session?.kernel?.id;
    const text = statusText(this.model, kernelId);
    return (
      <span
        className={`jp-GpuAttach-statusText${text.startsWith('GPU: idle') ? '' : ' jp-mod-active'}`}
        title={this.model.error ? this.model.error.message : 'GPU held by this notebook: click for the GPU pool'}
        onClick={this.open}
      >
        {text}
      </span>
    );
  }

  private _timer: number;
}

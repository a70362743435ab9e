/**
 * The sidebar panel: each GPU as a bar of slices with their owners and a small utilisation
 * history, this user's leases (notebook, cell, age, queue position) with a release button, and
 * a form that sets a notebook's default request by running `%gpu attach ...` in its kernel.
 */
import * as React from 'react';

import { Message } from '@lumino/messaging';

import { showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { Button, HTMLSelect, ReactWidget, UseSignal } from '@jupyterlab/ui-components';

import { GpuAttachError, IGpu, ILease, requestAPI } from './api';
import { GpuModel, describeBorrowed, describeLease, formatAge, formatBytes } from './model';

function basename(path: string | null): string {
  return path ? path.split('/').pop() || path : '';
}

/** A sparkline of a GPU's used share over the last samples. */
function History(props: { points: [number, number][] }): JSX.Element {
  const w = 120;
  const h = 22;
  const pts = props.points;
  if (pts.length < 2) {
    return <svg className="jp-GpuAttach-history" width={w} height={h} />;
  }
  const t0 = pts[0][0];
  const span = Math.max(pts[pts.length - 1][0] - t0, 1);
  const line = pts
    .map(([t, u]) => `${(((t - t0) / span) * (w - 2) + 1).toFixed(1)},${(h - 1 - u * (h - 2)).toFixed(1)}`)
    .join(' ');
  return (
    <svg className="jp-GpuAttach-history" width={w} height={h} aria-label="utilisation history">
      <polyline points={line} />
    </svg>
  );
}

function GpuBar(props: { gpu: IGpu }): JSX.Element {
  const g = props.gpu;
  const known = g.slices.reduce((s, x) => s + (x.memory || 0), 0);
  const unknown = g.slices.filter(x => x.memory === null).length;
  const otherEach = unknown ? Math.max(g.used_memory - known, 0) / unknown : 0;
  return (
    <div className="jp-GpuAttach-gpu" data-gpu={g.id}>
      <div className="jp-GpuAttach-gpuHead">
        <span className="jp-GpuAttach-gpuName">{g.id}</span>
        <span className="jp-GpuAttach-model">{g.model}</span>
        {g.simulated && <span className="jp-GpuAttach-badge">simulated</span>}
        {g.agent_state !== 'up' && (
          <span className="jp-GpuAttach-badge jp-mod-down">agent {g.agent_state}</span>
        )}
      </div>
      <div className="jp-GpuAttach-bar" title={`${Math.round(g.used_share * 100)}% in use`}>
        {g.slices.map(s => {
          const mem = s.memory === null ? otherEach : s.memory;
          const owner = s.mine ? basename(s.session) : 'another user';
          return (
            <div
              key={s.lease}
              className={`jp-GpuAttach-slice ${s.mine ? 'jp-mod-mine' : 'jp-mod-other'}`}
              style={{ width: `${(100 * mem) / g.memory}%` }}
              title={`${s.lease}: ${owner}${s.label ? ' · ' + s.label : ''} · ${formatBytes(mem)}`}
            />
          );
        })}
      </div>
      <div className="jp-GpuAttach-gpuFoot">
        <span>
          {Math.round(g.used_share * 100)}% of {formatBytes(g.memory)} in use ·{' '}
          {g.slices.length} slice{g.slices.length === 1 ? '' : 's'}
        </span>
        <History points={g.history} />
      </div>
    </div>
  );
}

function LeaseRow(props: {
  model: GpuModel;
  lease: ILease;
  notebookOf: (l: ILease) => string;
  onRelease: (id: string) => void;
}): JSX.Element {
  const l = props.lease;
  const age = l.age_s + (Date.now() - props.model.fetchedAt) / 1000;
  const queued = l.state === 'queued';
  return (
    <div className="jp-GpuAttach-lease" data-lease={l.id}>
      <div className="jp-GpuAttach-leaseText">
        <div className="jp-GpuAttach-notebook">{props.notebookOf(l)}</div>
        <div className="jp-GpuAttach-label" title={l.label}>
          {l.label || '(no cell label)'}
        </div>
        <div className="jp-GpuAttach-age">
          {queued ? (
            <span className="jp-GpuAttach-badge jp-GpuAttach-queued">
              queued{l.position !== null && l.position !== undefined ? ` #${l.position}` : ''}
              {l.of ? ` of ${l.of}` : ''}
            </span>
          ) : (
            describeLease(props.model, l)
          )}
          {l.borrowed ? (
            <span className="jp-GpuAttach-badge jp-GpuAttach-borrowed" title={describeBorrowed(l.borrowed)}>
              borrowed
            </span>
          ) : null}{' '}
          · {formatAge(age)} · <span title="lease id">{l.id}</span>
        </div>
      </div>
      <Button small minimal title={`release ${l.id} now`} onClick={() => props.onRelease(l.id)}>
        Release
      </Button>
    </div>
  );
}

interface IAttachState {
  notebook: string;
  kind: string;
  amount: string;
  pool: string;
  message: string;
  busy: boolean;
}

class AttachForm extends React.Component<{ tracker: INotebookTracker | null }, IAttachState> {
  state: IAttachState = { notebook: '', kind: 'memory', amount: '', pool: '', message: '', busy: false };

  render(): JSX.Element {
    const tracker = this.props.tracker;
    const paths: string[] = [];
    tracker?.forEach(p => paths.push(p.context.path));
    const current = this.state.notebook || tracker?.currentWidget?.context.path || paths[0] || '';
    if (!tracker) {
      return <div className="jp-GpuAttach-empty">Open a notebook to set its default request.</div>;
    }
    return (
      <div className="jp-GpuAttach-attach">
        <HTMLSelect
          aria-label="notebook"
          value={current}
          onChange={e => this.setState({ notebook: e.currentTarget.value })}
          options={paths.length ? paths.map(p => ({ label: basename(p), value: p })) : [{ label: 'no notebook open', value: '' }]}
        />
        <div className="jp-GpuAttach-attachRow">
          <HTMLSelect
            aria-label="request kind"
            value={this.state.kind}
            onChange={e => this.setState({ kind: e.currentTarget.value })}
            options={[
              { label: 'memory', value: 'memory' },
              { label: 'fraction', value: 'fraction' },
              { label: 'GPUs', value: 'gpus' }
            ]}
          />
          <input
            className="jp-mod-styled jp-GpuAttach-input"
            aria-label="amount"
            placeholder={{ memory: '8GiB', fraction: '0.25', gpus: '1' }[this.state.kind]}
            value={this.state.amount}
            onChange={e => this.setState({ amount: e.currentTarget.value })}
          />
        </div>
        <input
          className="jp-mod-styled jp-GpuAttach-input"
          aria-label="pool"
          placeholder="pool label (any pool)"
          value={this.state.pool}
          onChange={e => this.setState({ pool: e.currentTarget.value })}
        />
        <Button disabled={this.state.busy || !current} onClick={() => void this._attach(current)}>
          Set default request
        </Button>
        {this.state.message && <div className="jp-GpuAttach-message">{this.state.message}</div>}
      </div>
    );
  }

  private async _attach(path: string): Promise<void> {
    const panel = this.props.tracker?.find(p => p.context.path === path);
    const kernel = panel?.sessionContext.session?.kernel;
    if (!kernel) {
      this.setState({ message: `${basename(path)} has no running kernel: start one first.` });
      return;
    }
    const amount = this.state.amount.trim();
    const body: any = { [this.state.kind]: this.state.kind === 'memory' ? amount : Number(amount) };
    if (this.state.pool.trim()) {
      body.pool = this.state.pool.trim();
    }
    this.setState({ busy: true, message: '' });
    try {
      const { line, code } = await requestAPI<{ line: string; code: string }>('attach', {
        method: 'POST',
        body: JSON.stringify(body)
      });
      const reply = await kernel.requestExecute({ code, silent: false, store_history: false }).done;
      const content: any = reply.content;
      this.setState({
        message:
          content.status === 'ok'
            ? `${basename(path)}: ran ${line}`
            : `${basename(path)}: ${line} failed: ${content.ename}: ${content.evalue}`
      });
    } catch (error) {
      this.setState({ message: error instanceof GpuAttachError ? error.message : String(error) });
    } finally {
      this.setState({ busy: false });
    }
  }
}

export class GpuPanel extends ReactWidget {
  constructor(private model: GpuModel, private tracker: INotebookTracker | null) {
    super();
    this.addClass('jp-GpuAttach-panel');
    this.id = 'jp-gpu-attach-panel';
    this.title.caption = 'GPU pool (jupyter-gpu-attach)';
  }

  /** A hidden panel stands the poll by; showing it polls at once. */
  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this.model.refresh();
  }

  /** The notebook a lease serves: its path when the kernel is this server's, else its session. */
  private notebookOf = (l: ILease): string => {
    if (l.notebook) {
      return basename(l.notebook);
    }
    const panel = this.tracker?.find(p => p.sessionContext.session?.kernel?.id === l.kernel_id);
    return panel ? basename(panel.context.path) : l.session;
  };

  private release = async (id: string): Promise<void> => {
    try {
      await requestAPI(`leases/${id}`, { method: 'DELETE' });
    } catch (error) {
      void showErrorMessage(`Could not release ${id}`, error instanceof Error ? error.message : String(error));
    }
    await this.model.refresh();
  };

  render(): JSX.Element {
    return (
      <UseSignal signal={this.model.changed}>
        {() => this.renderState()}
      </UseSignal>
    );
  }

  private renderState(): JSX.Element {
    const state = this.model.state;
    const error = this.model.error;
    return (
      <div className="jp-GpuAttach-body">
        <div className="jp-GpuAttach-header">
          <h2>GPU pool</h2>
          <Button small minimal title="refresh now" onClick={() => void this.model.refresh()}>
            Refresh
          </Button>
        </div>
        {error && <div className="jp-GpuAttach-error">{error.message}</div>}
        {!state && !error && <div className="jp-GpuAttach-empty">Loading the GPU pool…</div>}
        {state && (
          <>
            <div className="jp-GpuAttach-broker">
              {state.broker.embedded ? 'embedded broker (this Jupyter server)' : `broker ${state.broker.url}`}
              {state.pool.simulated && <span className="jp-GpuAttach-badge">simulated devices</span>}
            </div>
            {state.pool.gpus.length === 0 && (
              <div className="jp-GpuAttach-empty">
                No GPUs registered. Start an agent: <code>gpu-attach agent --broker URL</code>
              </div>
            )}
            {state.pool.gpus.map(g => (
              <GpuBar key={g.id} gpu={g} />
            ))}
            <h3>Your leases</h3>
            {state.leases.length === 0 ? (
              <div className="jp-GpuAttach-empty jp-GpuAttach-noLeases">
                None: a GPU is held only while a %%gpu cell runs.
              </div>
            ) : (
              <div className="jp-GpuAttach-leases">
                {state.leases.map(l => (
                  <LeaseRow key={l.id} model={this.model} lease={l} notebookOf={this.notebookOf} onRelease={this.release} />
                ))}
              </div>
            )}
          </>
        )}
        <h3>Default request</h3>
        <AttachForm tracker={this.tracker} />
      </div>
    );
  }
}
